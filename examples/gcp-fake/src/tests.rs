//! End-to-end tests of the fake: the real google-cloud-rust clients round-trip against it, its
//! answers conform to the discovery schemas, and every fault knob and auth rule does what the
//! API promises.

use std::time::Duration;

use google_cloud_compute_v1::client::{Instances, ZoneOperations};
use google_cloud_compute_v1::model;
use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::retry_policy::NeverRetry;
use serde_json::{Value, json};

use super::*;
use crate::discovery::{Api, document};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fast() -> FakeOptions {
    FakeOptions {
        operation_delay: Duration::from_millis(50),
        boot_delay: Duration::from_millis(100),
        ..FakeOptions::default()
    }
}

fn mds_credentials(fake: &FakeGcp) -> google_cloud_auth::credentials::Credentials {
    google_cloud_auth::credentials::mds::Builder::default()
        .with_endpoint(fake.metadata_url())
        .build()
        .expect("MDS credentials build")
}

async fn compute_clients(fake: &FakeGcp) -> (Instances, ZoneOperations) {
    let instances = Instances::builder()
        .with_endpoint(fake.compute_endpoint())
        .with_credentials(mds_credentials(fake))
        .with_retry_policy(NeverRetry)
        .build()
        .await
        .expect("instances client");
    let operations = ZoneOperations::builder()
        .with_endpoint(fake.compute_endpoint())
        .with_credentials(mds_credentials(fake))
        .with_retry_policy(NeverRetry)
        .build()
        .await
        .expect("zone operations client");
    (instances, operations)
}

fn vm_body(name: &str) -> model::Instance {
    model::Instance::new()
        .set_name(name)
        .set_machine_type("zones/europe-west1-b/machineTypes/e2-small")
        .set_labels([("cascade", "gcp_vm")])
        .set_disks([model::AttachedDisk::new()
            .set_boot(true)
            .set_auto_delete(true)
            .set_initialize_params(
                model::AttachedDiskInitializeParams::new()
                    .set_source_image("projects/debian-cloud/global/images/family/debian-12")
                    .set_disk_size_gb(10),
            )])
        .set_network_interfaces([
            model::NetworkInterface::new().set_network("global/networks/default")
        ])
        .set_scheduling(
            model::Scheduling::new()
                .set_provisioning_model(model::scheduling::ProvisioningModel::Spot)
                .set_instance_termination_action(
                    model::scheduling::InstanceTerminationAction::Delete,
                ),
        )
}

/// Polls `check` every 10 ms until it holds or `within` passes.
async fn eventually<F: FnMut() -> bool>(within: Duration, mut check: F) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check()
}

async fn health(ip: &str, port: u16, path: &str) -> Result<u16, reqwest::Error> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let response = client
        .get(format!("http://{ip}:{port}{path}"))
        .send()
        .await?;
    Ok(response.status().as_u16())
}

fn status_of(fake: &FakeGcp, name: &str) -> Option<String> {
    fake.instances()
        .into_iter()
        .find(|i| i.name == name)
        .map(|i| i.status)
}

#[tokio::test]
async fn compute_round_trips_with_the_real_client() -> TestResult {
    let fake = FakeGcp::start(fast()).await?;
    let (instances, operations) = compute_clients(&fake).await;
    let project = fake.options().project.clone();
    let zone = fake.options().zone.clone();

    let op = instances
        .insert()
        .set_project(&project)
        .set_zone(&zone)
        .set_body(vm_body("cascade-vm-1"))
        .send()
        .await?;
    assert_eq!(op.operation_type.as_deref(), Some("insert"));
    assert_ne!(op.status, Some(model::operation::Status::Done));
    assert!(
        op.target_link
            .as_deref()
            .unwrap_or_default()
            .ends_with("/instances/cascade-vm-1")
    );
    let done = operations
        .wait()
        .set_project(&project)
        .set_zone(&zone)
        .set_operation(op.name.clone().unwrap_or_default())
        .send()
        .await?;
    assert_eq!(done.status, Some(model::operation::Status::Done));
    assert!(done.end_time.is_some());
    let got = operations
        .get()
        .set_project(&project)
        .set_zone(&zone)
        .set_operation(op.name.clone().unwrap_or_default())
        .send()
        .await?;
    assert_eq!(got.id, op.id);

    assert!(
        eventually(Duration::from_secs(3), || status_of(&fake, "cascade-vm-1")
            .as_deref()
            == Some("RUNNING"))
        .await
    );
    let vm = instances
        .get()
        .set_project(&project)
        .set_zone(&zone)
        .set_instance("cascade-vm-1")
        .send()
        .await?;
    assert_eq!(vm.status, Some(model::instance::Status::Running));
    assert_eq!(vm.labels.get("cascade").map(String::as_str), Some("gcp_vm"));
    let ip = vm.network_interfaces[0]
        .network_ip
        .clone()
        .unwrap_or_default();
    assert!(ip.starts_with("127.0."), "{ip}");
    assert_eq!(health(&ip, fake.vm_service_port(), "/health").await?, 200);

    let listed = instances
        .list()
        .set_project(&project)
        .set_zone(&zone)
        .set_filter("labels.cascade = \"gcp_vm\"")
        .send()
        .await?;
    assert_eq!(listed.items.len(), 1);
    let none = instances
        .list()
        .set_project(&project)
        .set_zone(&zone)
        .set_filter("labels.cascade=other")
        .send()
        .await?;
    assert!(none.items.is_empty());

    let conflict = instances
        .insert()
        .set_project(&project)
        .set_zone(&zone)
        .set_body(vm_body("cascade-vm-1"))
        .send()
        .await
        .expect_err("duplicate insert must fail");
    assert_eq!(conflict.http_status_code(), Some(409));
    let status = conflict.status().expect("Google error body");
    assert_eq!(status.code, Code::AlreadyExists);
    assert_eq!(
        status.message,
        "The resource 'projects/demo-project/zones/europe-west1-b/instances/cascade-vm-1' already exists"
    );

    fake.fail_compute("compute.instances.list", 1, 429, Some(7));
    let throttled = instances
        .list()
        .set_project(&project)
        .set_zone(&zone)
        .send()
        .await
        .expect_err("injected 429");
    assert_eq!(throttled.http_status_code(), Some(429));
    assert_eq!(
        throttled.status().map(|s| s.code),
        Some(Code::ResourceExhausted)
    );
    let retry_after = throttled
        .http_headers()
        .and_then(|h| h.get("retry-after"))
        .and_then(|v| v.to_str().ok());
    assert_eq!(retry_after, Some("7"));
    instances
        .list()
        .set_project(&project)
        .set_zone(&zone)
        .send()
        .await
        .expect("the fault was for one call only");

    let delete = instances
        .delete()
        .set_project(&project)
        .set_zone(&zone)
        .set_instance("cascade-vm-1")
        .send()
        .await?;
    assert_eq!(delete.operation_type.as_deref(), Some("delete"));
    assert_eq!(
        status_of(&fake, "cascade-vm-1").as_deref(),
        Some("STOPPING")
    );
    assert!(
        health(&ip, fake.vm_service_port(), "/health")
            .await
            .is_err(),
        "health server stops with the VM"
    );
    let done = operations
        .wait()
        .set_project(&project)
        .set_zone(&zone)
        .set_operation(delete.name.clone().unwrap_or_default())
        .send()
        .await?;
    assert_eq!(done.status, Some(model::operation::Status::Done));
    assert!(
        eventually(Duration::from_secs(1), || status_of(&fake, "cascade-vm-1")
            .is_none())
        .await
    );
    let missing = instances
        .get()
        .set_project(&project)
        .set_zone(&zone)
        .set_instance("cascade-vm-1")
        .send()
        .await
        .expect_err("deleted");
    assert_eq!(missing.http_status_code(), Some(404));
    assert_eq!(missing.status().map(|s| s.code), Some(Code::NotFound));

    let ops = operations
        .list()
        .set_project(&project)
        .set_zone(&zone)
        .set_filter("operationType = \"delete\"")
        .send()
        .await?;
    assert_eq!(ops.items.len(), 1);

    let methods: Vec<String> = fake
        .compute_requests()
        .into_iter()
        .map(|r| r.method_id)
        .collect();
    for expected in [
        "compute.instances.insert",
        "compute.instances.get",
        "compute.instances.list",
        "compute.instances.delete",
        "compute.zoneOperations.get",
        "compute.zoneOperations.wait",
        "compute.zoneOperations.list",
    ] {
        assert!(
            methods.iter().any(|m| m == expected),
            "{expected} not recorded"
        );
    }
    assert!(fake.compute_requests().iter().any(|r| r.status == 429));
    assert_eq!(fake.rejections(), Vec::<String>::new());
    assert!(
        fake.access_tokens_issued() >= 1,
        "the client authenticated through the metadata server"
    );
    Ok(())
}

#[tokio::test]
async fn the_real_insert_poller_completes() -> TestResult {
    use google_cloud_lro::Poller;
    let fake = FakeGcp::start(fast()).await?;
    let (instances, _) = compute_clients(&fake).await;
    let done = instances
        .insert()
        .set_project("demo-project")
        .set_zone("europe-west1-b")
        .set_body(vm_body("polled"))
        .poller()
        .until_done()
        .await?;
    assert_eq!(done.status, Some(model::operation::Status::Done));
    assert_eq!(fake.rejections(), Vec::<String>::new());
    Ok(())
}

#[tokio::test]
async fn stalled_operations_stay_running_and_wait_returns_anyway() -> TestResult {
    let fake = FakeGcp::start(fast()).await?;
    let (instances, operations) = compute_clients(&fake).await;
    fake.set_operations_complete(false);
    let op = instances
        .insert()
        .set_project("demo-project")
        .set_zone("europe-west1-b")
        .set_body(vm_body("stuck"))
        .send()
        .await?;
    let started = std::time::Instant::now();
    let waited = operations
        .wait()
        .set_project("demo-project")
        .set_zone("europe-west1-b")
        .set_operation(op.name.clone().unwrap_or_default())
        .send()
        .await?;
    assert_eq!(waited.status, Some(model::operation::Status::Running));
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "wait blocks up to its cap"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = operations
        .get()
        .set_project("demo-project")
        .set_zone("europe-west1-b")
        .set_operation(op.name.unwrap_or_default())
        .send()
        .await?;
    assert_eq!(got.status, Some(model::operation::Status::Running));
    Ok(())
}

/// The `compute.instances.preempted` operations targeting `vm`, listed with the real client.
async fn preemptions_of(
    operations: &ZoneOperations,
    vm: &str,
) -> Result<Vec<model::Operation>, google_cloud_gax::error::Error> {
    let ops = operations
        .list()
        .set_project("demo-project")
        .set_zone("europe-west1-b")
        .set_filter("operationType = \"compute.instances.preempted\"")
        .send()
        .await?;
    Ok(ops
        .items
        .into_iter()
        .filter(|op| {
            op.target_link
                .as_deref()
                .unwrap_or_default()
                .ends_with(&format!("/instances/{vm}"))
        })
        .collect())
}

#[tokio::test]
async fn a_preempted_vm_keeps_serving_through_the_grace_then_terminates() -> TestResult {
    let grace = Duration::from_millis(1000);
    let fake = FakeGcp::start(FakeOptions {
        preemption_grace: grace,
        ..fast()
    })
    .await?;
    let (instances, operations) = compute_clients(&fake).await;
    fake.add_instance("spot-1", &[("cascade", "gcp_vm")]);
    let vm = fake.instances().pop().expect("added");
    assert_eq!(vm.status, "RUNNING");
    let ip = vm.ip.expect("has an IP");
    let port = fake.vm_service_port();
    assert_eq!(health(&ip, port, "/health").await?, 200);
    assert_eq!(health(&ip, port, "/other").await?, 404);
    assert!(preemptions_of(&operations, "spot-1").await?.is_empty());

    let preempted = std::time::Instant::now();
    fake.preempt("spot-1");
    // At once: STOPPING in instances.list and a DONE preemption operation ...
    assert_eq!(status_of(&fake, "spot-1").as_deref(), Some("STOPPING"));
    let listed = instances
        .list()
        .set_project("demo-project")
        .set_zone("europe-west1-b")
        .send()
        .await?;
    assert_eq!(
        listed.items[0].status,
        Some(model::instance::Status::Stopping)
    );
    let ops = preemptions_of(&operations, "spot-1").await?;
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].status, Some(model::operation::Status::Done));
    assert_eq!(ops[0].target_id, listed.items[0].id);
    // ... while the guest is still shutting down and its service still answers.
    assert_eq!(
        health(&ip, port, "/health").await?,
        200,
        "the guest serves through the ACPI shutdown window"
    );
    assert!(
        preempted.elapsed() < grace,
        "the checks above took too long"
    );

    assert!(
        eventually(Duration::from_secs(3), || status_of(&fake, "spot-1")
            .as_deref()
            == Some("TERMINATED"))
        .await
    );
    assert!(
        preempted.elapsed() >= grace,
        "TERMINATED before the grace passed"
    );
    assert!(
        health(&ip, port, "/health").await.is_err(),
        "a TERMINATED VM's service must not answer"
    );
    // Preempting a stopped VM again changes nothing.
    fake.preempt("spot-1");
    assert_eq!(preemptions_of(&operations, "spot-1").await?.len(), 1);
    assert_eq!(fake.rejections(), Vec::<String>::new());
    Ok(())
}

#[tokio::test]
async fn the_preemption_grace_defaults_to_30s_and_can_change_at_run_time() -> TestResult {
    assert_eq!(
        FakeOptions::default().preemption_grace,
        Duration::from_secs(30)
    );
    let fake = FakeGcp::start(FakeOptions {
        operation_delay: Duration::from_millis(50),
        boot_delay: Duration::from_millis(100),
        ..FakeOptions::default()
    })
    .await?;
    fake.add_instance("slow", &[]);
    fake.add_instance("quick", &[]);
    let ip_of = |name: &str| {
        fake.instances()
            .into_iter()
            .find(|i| i.name == name)
            .and_then(|i| i.ip)
            .unwrap_or_default()
    };
    let slow_ip = ip_of("slow");
    fake.preempt("slow");
    fake.set_preemption_grace(Duration::from_millis(100));
    fake.preempt("quick");
    assert!(
        eventually(Duration::from_secs(2), || status_of(&fake, "quick")
            .as_deref()
            == Some("TERMINATED"))
        .await
    );
    assert!(
        health(&ip_of("quick"), fake.vm_service_port(), "/health")
            .await
            .is_err()
    );
    // "slow" was preempted under the 30 s default: still shutting down, still serving.
    assert_eq!(status_of(&fake, "slow").as_deref(), Some("STOPPING"));
    assert_eq!(
        health(&slow_ip, fake.vm_service_port(), "/health").await?,
        200
    );
    Ok(())
}

#[tokio::test]
async fn deleting_a_vm_during_its_preemption_grace_stops_it_and_removes_it() -> TestResult {
    let fake = FakeGcp::start(FakeOptions {
        preemption_grace: Duration::from_millis(50),
        operation_delay: Duration::from_millis(400),
        ..fast()
    })
    .await?;
    fake.add_instance("spot-2", &[]);
    let ip = fake.instances()[0].ip.clone().unwrap_or_default();
    fake.preempt("spot-2");
    let (status, _, op) = raw(
        reqwest::Method::DELETE,
        &format!(
            "{}/compute/v1/projects/demo-project/zones/europe-west1-b/instances/spot-2",
            fake.compute_endpoint()
        ),
        None,
        true,
    )
    .await?;
    assert_eq!(status, 200, "{op}");
    assert!(
        health(&ip, fake.vm_service_port(), "/health")
            .await
            .is_err()
    );
    // The grace has passed, but the VM is being deleted, not TERMINATED.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(status_of(&fake, "spot-2").as_deref(), Some("STOPPING"));
    assert!(
        eventually(Duration::from_secs(2), || status_of(&fake, "spot-2")
            .is_none())
        .await
    );
    assert_eq!(fake.rejections(), Vec::<String>::new());
    Ok(())
}

#[tokio::test]
async fn vms_get_distinct_addresses_and_lists_paginate() -> TestResult {
    let fake = FakeGcp::start(fast()).await?;
    for name in ["a-1", "a-2", "a-3"] {
        fake.add_instance(name, &[("cascade", "gcp_vm")]);
    }
    let ips: std::collections::BTreeSet<_> =
        fake.instances().into_iter().filter_map(|i| i.ip).collect();
    assert_eq!(ips.len(), 3);
    let (instances, _) = compute_clients(&fake).await;
    let first = instances
        .list()
        .set_project("demo-project")
        .set_zone("europe-west1-b")
        .set_max_results(2_u32)
        .send()
        .await?;
    assert_eq!(first.items.len(), 2);
    let token = first.next_page_token.clone().expect("more to come");
    let second = instances
        .list()
        .set_project("demo-project")
        .set_zone("europe-west1-b")
        .set_max_results(2_u32)
        .set_page_token(token)
        .send()
        .await?;
    assert_eq!(second.items.len(), 1);
    assert!(second.next_page_token.is_none());
    Ok(())
}

/// Sends a raw request with a bearer token, answering (status, headers, JSON body).
async fn raw(
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
    bearer: bool,
) -> Result<(u16, reqwest::header::HeaderMap, Value), reqwest::Error> {
    let mut request = reqwest::Client::new().request(method, url);
    if bearer {
        request = request.bearer_auth("ya29.test");
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    Ok((status, headers, body))
}

#[tokio::test]
async fn invalid_requests_get_google_errors_and_are_recorded() -> TestResult {
    let fake = FakeGcp::start(fast()).await?;
    let base = format!(
        "{}/compute/v1/projects/demo-project/zones/europe-west1-b/instances",
        fake.compute_endpoint()
    );

    let (status, _, body) = raw(
        reqwest::Method::GET,
        &format!("{base}?colour=blue"),
        None,
        true,
    )
    .await?;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], 400);
    assert_eq!(body["error"]["status"], "INVALID_ARGUMENT");
    assert_eq!(body["error"]["errors"][0]["reason"], "invalid");
    assert_eq!(body["error"]["errors"][0]["domain"], "global");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Unknown name \"colour\"")
    );

    let (status, _, body) = raw(
        reqwest::Method::POST,
        &base,
        Some(json!({"name": "vm-x", "machineType": "e2-small", "colour": "blue"})),
        true,
    )
    .await?;
    assert_eq!(status, 400);
    assert_eq!(
        body["error"]["message"],
        "Invalid JSON payload received. Unknown name \"colour\" at 'instance': Cannot find field."
    );

    let (status, _, body) = raw(
        reqwest::Method::POST,
        &base,
        Some(json!({"name": "Not_Valid"})),
        true,
    )
    .await?;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("'resource.name': 'Not_Valid'")
    );

    let (status, headers, body) = raw(reqwest::Method::GET, &base, None, false).await?;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["status"], "UNAUTHENTICATED");
    assert!(headers.contains_key("www-authenticate"));

    let (status, _, _) = raw(
        reqwest::Method::GET,
        &format!("{}/compute/v1/nothing/here", fake.compute_endpoint()),
        None,
        true,
    )
    .await?;
    assert_eq!(status, 404);

    let (status, _, body) = raw(
        reqwest::Method::GET,
        &format!(
            "{}/compute/v1/projects/demo-project/zones/europe-west1-b/disks",
            fake.compute_endpoint()
        ),
        None,
        true,
    )
    .await?;
    assert_eq!(status, 501, "{body}");

    let rejections = fake.rejections();
    assert_eq!(rejections.len(), 6, "{rejections:#?}");
    assert!(rejections[0].starts_with("compute.instances.list: "));
    assert!(rejections[0].contains("colour"));
    assert!(rejections[5].starts_with("compute.disks.list: "));
    Ok(())
}

#[tokio::test]
async fn calls_to_methods_the_fake_does_not_implement_are_rejections() -> TestResult {
    let fake = FakeGcp::start(fast()).await?;
    let zone = format!(
        "{}/compute/v1/projects/demo-project/zones/europe-west1-b",
        fake.compute_endpoint()
    );
    fake.add_instance("vm-1", &[]);
    // A fault knob does not hide that the method is unimplemented.
    fake.fail_compute("compute.instances.stop", 1, 503, None);
    let (status, _, body) = raw(
        reqwest::Method::POST,
        &format!("{zone}/instances/vm-1/stop"),
        Some(json!({})),
        true,
    )
    .await?;
    assert_eq!(status, 501, "{body}");
    assert_eq!(body["error"]["status"], "UNIMPLEMENTED");
    assert_eq!(body["error"]["errors"][0]["reason"], "notImplemented");
    assert_eq!(status_of(&fake, "vm-1").as_deref(), Some("RUNNING"));
    let (status, _, _) = raw(reqwest::Method::GET, &format!("{zone}/disks"), None, true).await?;
    assert_eq!(status, 501);
    let (status, _, body) = raw(
        reqwest::Method::GET,
        &format!(
            "{}/v2/projects/demo-project/locations/europe-west1/services",
            fake.run_admin_endpoint()
        ),
        None,
        true,
    )
    .await?;
    assert_eq!(status, 501, "{body}");
    assert_eq!(body["error"]["status"], "UNIMPLEMENTED");

    let rejections = fake.rejections();
    assert_eq!(rejections.len(), 3, "{rejections:#?}");
    assert!(
        rejections[0].starts_with("compute.instances.stop: "),
        "{}",
        rejections[0]
    );
    assert!(
        rejections[1].starts_with("compute.disks.list: "),
        "{}",
        rejections[1]
    );
    assert!(
        rejections[2].starts_with("run.projects.locations.services.list: "),
        "{}",
        rejections[2]
    );
    let recorded: Vec<(String, u16)> = fake
        .compute_requests()
        .into_iter()
        .map(|r| (r.method_id, r.status))
        .collect();
    assert_eq!(
        recorded,
        vec![
            ("compute.instances.stop".to_string(), 501),
            ("compute.disks.list".to_string(), 501)
        ]
    );
    assert_eq!(fake.admin_requests(), 1);
    Ok(())
}

/// What a validation case breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Breaks {
    /// (a) an unknown query parameter.
    UnknownQuery,
    /// (b) an unknown (nested) body field.
    UnknownField,
    /// (c) a field or parameter of the wrong type (or enum value).
    WrongType,
    /// A body where the method takes none, or a body that is not a JSON object.
    Body,
}

struct Case {
    method_id: &'static str,
    breaks: Breaks,
    verb: reqwest::Method,
    /// Relative to the compute endpoint (or, for `run.`, the run admin endpoint).
    path: String,
    body: Option<Value>,
    /// What the error message must contain (the offending field, in Google's words).
    names: &'static str,
}

/// Every method the fake implements, with one invalid request per way to break it, must answer
/// 400 in Google's error shape naming the field, and be recorded as a rejection; a valid request
/// to each is accepted.
#[tokio::test]
async fn every_implemented_method_validates_query_body_and_types() -> TestResult {
    let fake = FakeGcp::start(fast()).await?;
    let zone = "/compute/v1/projects/demo-project/zones/europe-west1-b";
    let service = "/v2/projects/demo-project/locations/europe-west1/services/ecapa";
    let url = |method_id: &str, path: &str| {
        let endpoint = if method_id.starts_with("run.") {
            fake.run_admin_endpoint()
        } else {
            fake.compute_endpoint()
        };
        format!("{endpoint}{path}")
    };
    let good = serde_json::to_value(vm_body("valid-vm"))?;
    let with = |pointer: &str, value: Value| {
        let mut body = good.clone();
        let (parent, key) = pointer.rsplit_once('/').unwrap_or_default();
        if let Some(object) = body.pointer_mut(parent).and_then(Value::as_object_mut) {
            object.insert(key.to_string(), value);
        }
        body
    };
    assert!(
        good.pointer("/scheduling").is_some()
            && good.pointer("/disks/0/initializeParams").is_some()
    );

    // One valid request per method, the way google-cloud-rust sends them.
    fake.add_instance("vm-ok", &[("cascade", "gcp_vm")]);
    let (status, _, op) = raw(
        reqwest::Method::POST,
        &url(
            "",
            &format!("{zone}/instances?%24alt=json&requestId=1b4e28ba-2fa1-11d2-883f-0016d3cca427"),
        ),
        Some(good.clone()),
        true,
    )
    .await?;
    assert_eq!(status, 200, "{op}");
    let op_name = op["name"].as_str().unwrap_or_default().to_string();
    let valid: Vec<(&str, reqwest::Method, String, Option<Value>)> = vec![
        (
            "compute.instances.get",
            reqwest::Method::GET,
            format!("{zone}/instances/vm-ok?%24alt=json"),
            None,
        ),
        (
            "compute.instances.list",
            reqwest::Method::GET,
            format!("{zone}/instances?filter=labels.cascade%20%3D%20%22gcp_vm%22&maxResults=10"),
            None,
        ),
        (
            "compute.zoneOperations.get",
            reqwest::Method::GET,
            format!("{zone}/operations/{op_name}"),
            None,
        ),
        (
            "compute.zoneOperations.wait",
            reqwest::Method::POST,
            format!("{zone}/operations/{op_name}/wait"),
            Some(json!({})),
        ),
        (
            "compute.zoneOperations.list",
            reqwest::Method::GET,
            format!("{zone}/operations?maxResults=5&prettyPrint=false"),
            None,
        ),
        (
            "compute.instances.delete",
            reqwest::Method::DELETE,
            format!(
                "{zone}/instances/vm-ok?requestId=1b4e28ba-2fa1-11d2-883f-0016d3cca428&noGracefulShutdown=false"
            ),
            None,
        ),
        (
            "run.projects.locations.services.get",
            reqwest::Method::GET,
            format!("{service}?%24alt=json%3Benum-encoding%3Dint"),
            None,
        ),
    ];
    for (method_id, verb, path, body) in valid {
        let (status, _, answer) = raw(verb, &url(method_id, &path), body, true).await?;
        assert_eq!(status, 200, "{method_id}: {answer}");
    }
    let accepted: Vec<String> = fake
        .compute_requests()
        .iter()
        .map(|r| r.method_id.clone())
        .collect();
    for method_id in compute::IMPLEMENTED {
        assert!(
            accepted.iter().any(|m| m == method_id),
            "no valid {method_id} was sent"
        );
    }
    assert_eq!(fake.rejections(), Vec::<String>::new());

    use Breaks::*;
    use reqwest::Method as M;
    let case = |method_id, breaks, verb, path: String, body, names| Case {
        method_id,
        breaks,
        verb,
        path,
        body,
        names,
    };
    let insert = format!("{zone}/instances");
    let vm = format!("{zone}/instances/vm-ok");
    let ops = format!("{zone}/operations");
    let op = format!("{zone}/operations/operation-1");
    let cases = vec![
        case(
            "compute.instances.insert",
            UnknownQuery,
            M::POST,
            format!("{insert}?colour=blue"),
            Some(good.clone()),
            "Unknown name \"colour\": Cannot bind query parameter",
        ),
        case(
            "compute.instances.insert",
            UnknownField,
            M::POST,
            insert.clone(),
            Some(with("/scheduling/colour", json!("blue"))),
            "Unknown name \"colour\" at 'instance.scheduling'",
        ),
        case(
            "compute.instances.insert",
            UnknownField,
            M::POST,
            insert.clone(),
            Some(with("/disks/0/initializeParams/bogus", json!(1))),
            "Unknown name \"bogus\" at 'instance.disks[0].initializeParams'",
        ),
        case(
            "compute.instances.insert",
            UnknownField,
            M::POST,
            insert.clone(),
            Some(with("/colour", json!("blue"))),
            "Unknown name \"colour\" at 'instance'",
        ),
        case(
            "compute.instances.insert",
            WrongType,
            M::POST,
            insert.clone(),
            Some(with("/scheduling/automaticRestart", json!("yes"))),
            "'instance.scheduling.automaticRestart' (TYPE_BOOL)",
        ),
        case(
            "compute.instances.insert",
            WrongType,
            M::POST,
            insert.clone(),
            Some(with("/disks/0/initializeParams/diskSizeGb", json!("ten"))),
            "'instance.disks[0].initializeParams.diskSizeGb' (TYPE_INT64)",
        ),
        case(
            "compute.instances.insert",
            WrongType,
            M::POST,
            insert.clone(),
            Some(with("/labels", json!({"cascade": 5}))),
            "'instance.labels[cascade]' (TYPE_STRING)",
        ),
        case(
            "compute.instances.insert",
            WrongType,
            M::POST,
            insert.clone(),
            Some(with("/scheduling/provisioningModel", json!("SPOTTY"))),
            "'instance.scheduling.provisioningModel' (TYPE_ENUM)",
        ),
        case(
            "compute.instances.insert",
            WrongType,
            M::POST,
            insert.clone(),
            Some(with("/networkInterfaces", json!({"network": "x"}))),
            "'instance.networkInterfaces' (TYPE_LIST)",
        ),
        case(
            "compute.instances.insert",
            WrongType,
            M::POST,
            format!("{insert}?prettyPrint=maybe"),
            Some(good.clone()),
            "'prettyPrint' (TYPE_BOOL)",
        ),
        case(
            "compute.instances.insert",
            Body,
            M::POST,
            insert.clone(),
            Some(json!([good.clone()])),
            "Root element must be a message",
        ),
        case(
            "compute.instances.get",
            UnknownQuery,
            M::GET,
            format!("{vm}?colour=blue"),
            None,
            "Unknown name \"colour\"",
        ),
        case(
            "compute.instances.get",
            WrongType,
            M::GET,
            format!("{vm}?prettyPrint=maybe"),
            None,
            "'prettyPrint' (TYPE_BOOL)",
        ),
        case(
            "compute.instances.get",
            Body,
            M::GET,
            vm.clone(),
            Some(json!({})),
            "compute.instances.get is a GET method and takes no request body",
        ),
        case(
            "compute.instances.list",
            UnknownQuery,
            M::GET,
            format!("{insert}?colour=blue"),
            None,
            "Unknown name \"colour\"",
        ),
        case(
            "compute.instances.list",
            WrongType,
            M::GET,
            format!("{insert}?maxResults=lots"),
            None,
            "'maxResults' (TYPE_UINT32)",
        ),
        case(
            "compute.instances.list",
            WrongType,
            M::GET,
            format!("{insert}?maxResults=99999999999"),
            None,
            "'maxResults' (TYPE_UINT32), \"99999999999\"",
        ),
        case(
            "compute.instances.list",
            Body,
            M::GET,
            insert.clone(),
            Some(json!({"filter": "x"})),
            "takes no request body",
        ),
        case(
            "compute.instances.delete",
            UnknownQuery,
            M::DELETE,
            format!("{vm}?force=true"),
            None,
            "Unknown name \"force\"",
        ),
        case(
            "compute.instances.delete",
            WrongType,
            M::DELETE,
            format!("{vm}?noGracefulShutdown=maybe"),
            None,
            "'noGracefulShutdown' (TYPE_BOOL)",
        ),
        case(
            "compute.instances.delete",
            Body,
            M::DELETE,
            vm.clone(),
            Some(json!({"requestId": "x"})),
            "compute.instances.delete is a DELETE method and takes no request body",
        ),
        case(
            "compute.zoneOperations.get",
            UnknownQuery,
            M::GET,
            format!("{op}?colour=blue"),
            None,
            "Unknown name \"colour\"",
        ),
        case(
            "compute.zoneOperations.get",
            WrongType,
            M::GET,
            format!("{op}?prettyPrint=maybe"),
            None,
            "'prettyPrint' (TYPE_BOOL)",
        ),
        case(
            "compute.zoneOperations.get",
            Body,
            M::GET,
            op.clone(),
            Some(json!([])),
            "takes no request body",
        ),
        case(
            "compute.zoneOperations.wait",
            UnknownQuery,
            M::POST,
            format!("{op}/wait?timeout=5s"),
            Some(json!({})),
            "Unknown name \"timeout\": Cannot bind query parameter",
        ),
        case(
            "compute.zoneOperations.wait",
            WrongType,
            M::POST,
            format!("{op}/wait?%24.xgafv=3"),
            Some(json!({})),
            "'$.xgafv' (TYPE_ENUM)",
        ),
        case(
            "compute.zoneOperations.wait",
            Body,
            M::POST,
            format!("{op}/wait"),
            Some(json!({"timeout": "5s"})),
            "Unknown name \"timeout\": Cannot find field",
        ),
        case(
            "compute.zoneOperations.wait",
            Body,
            M::POST,
            format!("{op}/wait"),
            Some(json!("5s")),
            "Root element must be a message",
        ),
        case(
            "compute.zoneOperations.list",
            UnknownQuery,
            M::GET,
            format!("{ops}?colour=blue"),
            None,
            "Unknown name \"colour\"",
        ),
        case(
            "compute.zoneOperations.list",
            WrongType,
            M::GET,
            format!("{ops}?maxResults=-1"),
            None,
            "'maxResults' (TYPE_UINT32)",
        ),
        case(
            "compute.zoneOperations.list",
            Body,
            M::GET,
            ops.clone(),
            Some(json!(null)),
            "takes no request body",
        ),
        case(
            "run.projects.locations.services.get",
            UnknownQuery,
            M::GET,
            format!("{service}?colour=blue"),
            None,
            "Unknown name \"colour\"",
        ),
        case(
            "run.projects.locations.services.get",
            WrongType,
            M::GET,
            format!("{service}?prettyPrint=maybe"),
            None,
            "'prettyPrint' (TYPE_BOOL)",
        ),
        case(
            "run.projects.locations.services.get",
            WrongType,
            M::GET,
            format!("{service}?%24alt=xml"),
            None,
            "'$alt'",
        ),
        case(
            "run.projects.locations.services.get",
            Body,
            M::GET,
            service.to_string(),
            Some(json!({})),
            "takes no request body",
        ),
    ];

    // The table covers every implemented method in every way that applies to it.
    for method_id in compute::IMPLEMENTED.iter().chain(run::IMPLEMENTED) {
        let has_body = method_id.ends_with(".insert");
        let mut needed = vec![UnknownQuery, WrongType, Body];
        if has_body {
            needed.push(UnknownField);
        }
        for breaks in needed {
            assert!(
                cases
                    .iter()
                    .any(|c| c.method_id == *method_id && c.breaks == breaks),
                "no {breaks:?} case for {method_id}"
            );
        }
    }

    for c in cases {
        let before = fake.rejections().len();
        let (status, _, answer) = raw(
            c.verb.clone(),
            &url(c.method_id, &c.path),
            c.body.clone(),
            true,
        )
        .await?;
        let what = format!("{} {:?} {} {}", c.method_id, c.breaks, c.verb, c.path);
        assert_eq!(status, 400, "{what}: {answer}");
        let error = &answer["error"];
        assert_eq!(error["code"], 400, "{what}: {answer}");
        assert_eq!(error["status"], "INVALID_ARGUMENT", "{what}: {answer}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(c.names),
            "{what}: {message:?} does not name {:?}",
            c.names
        );
        if c.method_id.starts_with("compute.") {
            assert_eq!(error["errors"][0]["reason"], "invalid", "{what}: {answer}");
            assert_eq!(error["errors"][0]["message"], message, "{what}: {answer}");
            let last = fake.compute_requests().pop().expect("recorded");
            assert_eq!(
                (last.method_id.as_str(), last.status),
                (c.method_id, 400),
                "{what}"
            );
        } else {
            assert!(
                error.get("errors").is_none(),
                "{what}: Cloud Run v2 errors have no errors[]"
            );
        }
        let rejections = fake.rejections();
        assert_eq!(rejections.len(), before + 1, "{what}: {rejections:#?}");
        let recorded = &rejections[before];
        assert!(
            recorded.starts_with(&format!("{}: ", c.method_id)),
            "{what}: {recorded}"
        );
        assert!(recorded.contains(c.names), "{what}: {recorded}");
    }
    Ok(())
}

#[tokio::test]
async fn fault_knob_answers_503_with_retry_after_then_recovers() -> TestResult {
    let fake = FakeGcp::start(fast()).await?;
    fake.fail_compute("compute.instances.get", 2, 503, None);
    let url = format!(
        "{}/compute/v1/projects/demo-project/zones/europe-west1-b/instances/nope",
        fake.compute_endpoint()
    );
    for _ in 0..2 {
        let (status, headers, body) = raw(reqwest::Method::GET, &url, None, true).await?;
        assert_eq!(status, 503);
        assert_eq!(body["error"]["status"], "UNAVAILABLE");
        assert_eq!(body["error"]["errors"][0]["reason"], "backendError");
        assert!(!headers.contains_key("retry-after"));
    }
    let (status, _, body) = raw(reqwest::Method::GET, &url, None, true).await?;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["errors"][0]["reason"], "notFound");
    Ok(())
}

#[tokio::test]
async fn compute_answers_conform_to_the_discovery_schemas() -> TestResult {
    let fake = FakeGcp::start(fast()).await?;
    let compute = document(Api::Compute);
    let base = format!(
        "{}/compute/v1/projects/demo-project/zones/europe-west1-b",
        fake.compute_endpoint()
    );
    let (status, _, op) = raw(
        reqwest::Method::POST,
        &format!("{base}/instances"),
        Some(
            json!({"name": "schema-vm", "machineType": "zones/europe-west1-b/machineTypes/e2-small",
            "labels": {"cascade": "gcp_vm"}}),
        ),
        true,
    )
    .await?;
    assert_eq!(status, 200, "{op}");
    compute.check_schema("Operation", &op, "operation", "")?;
    assert_eq!(op["kind"], "compute#operation");
    assert!(op["id"].is_string() && op["targetId"].is_string());
    assert!(
        eventually(Duration::from_secs(2), || status_of(&fake, "schema-vm")
            .as_deref()
            == Some("RUNNING"))
        .await
    );
    let (_, _, vm) = raw(
        reqwest::Method::GET,
        &format!("{base}/instances/schema-vm"),
        None,
        true,
    )
    .await?;
    compute.check_schema("Instance", &vm, "instance", "")?;
    assert_eq!(vm["kind"], "compute#instance");
    assert!(vm["id"].is_string());
    assert!(
        vm["creationTimestamp"]
            .as_str()
            .unwrap_or_default()
            .ends_with("-07:00")
    );
    assert!(
        vm["zone"]
            .as_str()
            .unwrap_or_default()
            .ends_with("/zones/europe-west1-b")
    );
    let (_, _, list) = raw(
        reqwest::Method::GET,
        &format!("{base}/instances"),
        None,
        true,
    )
    .await?;
    compute.check_schema("InstanceList", &list, "list", "")?;
    let (_, _, ops) = raw(
        reqwest::Method::GET,
        &format!("{base}/operations"),
        None,
        true,
    )
    .await?;
    compute.check_schema("OperationList", &ops, "list", "")?;

    let run = document(Api::Run);
    let name = "projects/demo-project/locations/europe-west1/services/ecapa";
    let (status, _, service) = raw(
        reqwest::Method::GET,
        &format!("{}/v2/{name}", fake.run_admin_endpoint()),
        None,
        true,
    )
    .await?;
    assert_eq!(status, 200);
    run.check_schema("GoogleCloudRunV2Service", &service, "service", "")?;
    assert_eq!(service["terminalCondition"]["state"], "CONDITION_SUCCEEDED");
    let (_, _, numeric) = raw(
        reqwest::Method::GET,
        &format!(
            "{}/v2/{name}?%24alt=json%3Benum-encoding%3Dint",
            fake.run_admin_endpoint()
        ),
        None,
        true,
    )
    .await?;
    assert_eq!(numeric["terminalCondition"]["state"], 4);
    assert_eq!(numeric["ingress"], 1);
    assert_eq!(fake.rejections(), Vec::<String>::new());
    Ok(())
}

#[tokio::test]
async fn cloud_run_admin_round_trips_with_the_real_client() -> TestResult {
    use google_cloud_run_v2::model::condition::State as ConditionState;
    let fake = FakeGcp::start(fast()).await?;
    let services = google_cloud_run_v2::client::Services::builder()
        .with_endpoint(fake.run_admin_endpoint())
        .with_credentials(mds_credentials(&fake))
        .with_retry_policy(NeverRetry)
        .build()
        .await?;
    let name = "projects/demo-project/locations/europe-west1/services/ecapa";
    let service = services.get_service().set_name(name).send().await?;
    let ready = service
        .terminal_condition
        .clone()
        .expect("terminal condition");
    assert_eq!(ready.r#type, "Ready");
    assert_eq!(ready.state, ConditionState::ConditionSucceeded);
    assert_eq!(service.uri, fake.service_url());
    assert_eq!(service.urls, vec![fake.service_url()]);

    fake.set_service_ready(false, "Revision 'ecapa-00002' is not ready.");
    let service = services.get_service().set_name(name).send().await?;
    let ready = service.terminal_condition.expect("terminal condition");
    assert_eq!(ready.state, ConditionState::ConditionFailed);
    assert_eq!(ready.message, "Revision 'ecapa-00002' is not ready.");

    let missing = services
        .get_service()
        .set_name("projects/demo-project/locations/europe-west1/services/other")
        .send()
        .await
        .expect_err("unknown service");
    assert_eq!(missing.http_status_code(), Some(404));
    assert_eq!(missing.status().map(|s| s.code), Some(Code::NotFound));
    assert_eq!(fake.admin_requests(), 3);
    assert_eq!(fake.rejections(), Vec::<String>::new());
    Ok(())
}

#[tokio::test]
async fn metadata_id_token_opens_the_service() -> TestResult {
    let fake = FakeGcp::start(fast()).await?;
    let credentials =
        google_cloud_auth::credentials::idtoken::mds::Builder::new(fake.service_url())
            .with_endpoint(fake.metadata_url())
            .build()?;
    let token = credentials.id_token().await?;
    assert_eq!(fake.id_tokens_issued().metadata, 1);
    let response = reqwest::Client::new()
        .get(format!("{}/health", fake.service_url()))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await?["status"], "ok");
    let requests = fake.service_requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].path, "/health");
    assert_eq!(requests[0].bearer.as_deref(), Some(token.as_str()));
    assert_eq!(requests[0].status, 200);
    Ok(())
}

async fn metadata_get(
    fake: &FakeGcp,
    path: &str,
    flavor: bool,
) -> Result<(u16, bool, String), reqwest::Error> {
    let mut request = reqwest::Client::new().get(format!("{}{path}", fake.metadata_url()));
    if flavor {
        request = request.header("Metadata-Flavor", "Google");
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let stamped = response
        .headers()
        .get("metadata-flavor")
        .is_some_and(|v| v == "Google");
    Ok((status, stamped, response.text().await?))
}

#[tokio::test]
async fn metadata_server_demands_its_header_and_serves_tokens() -> TestResult {
    let fake = FakeGcp::start(fast()).await?;
    let sa = "/computeMetadata/v1/instance/service-accounts/default";
    let (status, stamped, _) =
        metadata_get(&fake, &format!("{sa}/identity?audience=x"), false).await?;
    assert_eq!((status, stamped), (403, true));
    assert_eq!(fake.id_tokens_issued().metadata, 0);

    let (status, stamped, token) = metadata_get(
        &fake,
        &format!("{sa}/identity?audience=aud-1&format=full"),
        true,
    )
    .await?;
    assert_eq!((status, stamped), (200, true));
    let claims = fake.shared.keys.verify(&token)?;
    assert_eq!(claims["aud"], "aud-1");
    assert_eq!(claims["iss"], "https://accounts.google.com");
    assert_eq!(
        claims["google"]["compute_engine"]["project_id"],
        "demo-project"
    );
    let lifetime =
        claims["exp"].as_u64().unwrap_or_default() - claims["iat"].as_u64().unwrap_or_default();
    assert_eq!(lifetime, 3600);

    let (status, _, _) = metadata_get(&fake, &format!("{sa}/identity"), true).await?;
    assert_eq!(status, 400);
    let (status, _, body) = metadata_get(&fake, &format!("{sa}/token"), true).await?;
    assert_eq!(status, 200);
    let body: Value = serde_json::from_str(&body)?;
    assert_eq!(body["token_type"], "Bearer");
    assert!(body["access_token"].is_string() && body["expires_in"].is_u64());
    let (_, _, domain) =
        metadata_get(&fake, "/computeMetadata/v1/universe/universe-domain", true).await?;
    assert_eq!(domain, "googleapis.com");
    let (_, _, project) =
        metadata_get(&fake, "/computeMetadata/v1/project/project-id", true).await?;
    assert_eq!(project, "demo-project");

    fake.set_token_lifetime(Duration::from_secs(120));
    let (_, _, token) = metadata_get(&fake, &format!("{sa}/identity?audience=aud-1"), true).await?;
    let claims = fake.shared.keys.verify(&token)?;
    assert_eq!(
        claims["exp"].as_u64().unwrap_or_default() - claims["iat"].as_u64().unwrap_or_default(),
        120
    );

    fake.fail_token_requests(Some(503));
    let (status, _, _) =
        metadata_get(&fake, &format!("{sa}/identity?audience=aud-1"), true).await?;
    assert_eq!(status, 503);
    let (status, _, _) = metadata_get(&fake, &format!("{sa}/token"), true).await?;
    assert_eq!(status, 503);
    fake.fail_token_requests(None);
    let (status, _, _) =
        metadata_get(&fake, &format!("{sa}/identity?audience=aud-1"), true).await?;
    assert_eq!(status, 200);
    assert_eq!(fake.id_tokens_issued().metadata, 3);
    Ok(())
}

/// A JWT-bearer assertion signed with the test key, as cascade builds it.
fn assertion(fake: &FakeGcp, extra: Value, lifetime: u64) -> String {
    let now = crate::server::unix_now();
    let email = token::client_email("demo-project");
    let mut claims = json!({
        "iss": email, "sub": email, "aud": fake.token_uri(), "iat": now, "exp": now + lifetime,
    });
    if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
        claims.extend(extra.clone());
    }
    fake.shared.keys.sign(&claims)
}

async fn post_token(
    fake: &FakeGcp,
    grant_type: &str,
    assertion: &str,
) -> Result<(u16, Value), reqwest::Error> {
    let response = reqwest::Client::new()
        .post(fake.token_uri())
        .form(&[("grant_type", grant_type), ("assertion", assertion)])
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

#[tokio::test]
async fn token_endpoint_issues_id_tokens_for_signed_assertions() -> TestResult {
    let fake = FakeGcp::start(fast()).await?;
    let key = fake.service_account_key_json();
    assert_eq!(key["token_uri"], fake.token_uri());
    assert_eq!(key["client_email"], token::client_email("demo-project"));

    let good = assertion(&fake, json!({"target_audience": fake.service_url()}), 3600);
    let (status, body) = post_token(&fake, JWT_BEARER, &good).await?;
    assert_eq!(status, 200, "{body}");
    let id_token = body["id_token"].as_str().unwrap_or_default().to_string();
    let claims = fake.shared.keys.verify(&id_token)?;
    assert_eq!(claims["aud"], fake.service_url());
    assert_eq!(claims["email"], key["client_email"]);
    assert_eq!(fake.id_tokens_issued().token_endpoint, 1);
    let response = reqwest::Client::new()
        .get(format!("{}/health", fake.service_url()))
        .bearer_auth(&id_token)
        .send()
        .await?;
    assert_eq!(response.status(), 200);

    let (status, body) = post_token(
        &fake,
        JWT_BEARER,
        &assertion(
            &fake,
            json!({"scope": "https://www.googleapis.com/auth/cloud-platform"}),
            600,
        ),
    )
    .await?;
    assert_eq!(status, 200);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(fake.access_tokens_issued(), 1);

    // The signature of another payload: right key, wrong bytes.
    let other = assertion(&fake, json!({"target_audience": "other"}), 3600);
    let mut parts: Vec<&str> = good.split('.').collect();
    let forged_signature = other.rsplit('.').next().unwrap_or_default();
    parts[2] = forged_signature;
    let forged = parts.join(".");
    let (status, body) = post_token(&fake, JWT_BEARER, &forged).await?;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_grant");
    assert_eq!(body["error_description"], "Invalid JWT Signature.");

    let (status, body) = post_token(
        &fake,
        JWT_BEARER,
        &assertion(
            &fake,
            json!({"target_audience": "x", "aud": "https://oauth2.googleapis.com/token"}),
            3600,
        ),
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    let (status, body) = post_token(
        &fake,
        JWT_BEARER,
        &assertion(&fake, json!({"target_audience": "x"}), 7200),
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    let (status, body) = post_token(
        &fake,
        JWT_BEARER,
        &assertion(
            &fake,
            json!({"target_audience": "x", "iss": "someone@else"}),
            600,
        ),
    )
    .await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    let (status, body) = post_token(&fake, "client_credentials", &good).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
    let (status, body) = post_token(&fake, JWT_BEARER, &assertion(&fake, json!({}), 600)).await?;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_scope"))
    );

    fake.fail_token_requests(Some(500));
    let (status, _) = post_token(&fake, JWT_BEARER, &good).await?;
    assert_eq!(status, 500);
    assert_eq!(fake.id_tokens_issued().token_endpoint, 1);
    Ok(())
}

#[tokio::test]
async fn the_service_checks_id_tokens_like_cloud_run() -> TestResult {
    let fake = FakeGcp::start(fast()).await?;
    let client = reqwest::Client::new();
    let call = |bearer: Option<String>| {
        let mut request = client.get(format!("{}/health", fake.service_url()));
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        request.send()
    };
    let email = "someone@demo-project.iam.gserviceaccount.com";
    let valid = fake.shared.keys.sign(&token::id_token_claims(
        &fake.service_url(),
        email,
        Duration::from_secs(600),
    ));
    let other_audience = fake.shared.keys.sign(&token::id_token_claims(
        "https://other.run.app",
        email,
        Duration::from_secs(600),
    ));
    let mut expired_claims =
        token::id_token_claims(&fake.service_url(), email, Duration::from_secs(600));
    expired_claims["exp"] = json!(crate::server::unix_now() - 10);
    let expired = fake.shared.keys.sign(&expired_claims);

    let response = call(None).await?;
    assert_eq!(response.status(), 401);
    assert!(response.headers().contains_key("www-authenticate"));
    assert_eq!(call(Some("not-a-jwt".into())).await?.status(), 401);
    assert_eq!(call(Some(expired)).await?.status(), 401);
    assert_eq!(call(Some(other_audience)).await?.status(), 403);
    assert_eq!(call(Some(valid.clone())).await?.status(), 200);

    fake.set_service_fault(Some(ServiceFault {
        status: 429,
        retry_after: Some(3),
    }));
    let response = call(Some(valid.clone())).await?;
    assert_eq!(response.status(), 429);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("3")
    );
    fake.set_service_fault(Some(ServiceFault {
        status: 503,
        retry_after: None,
    }));
    let response = call(Some(valid.clone())).await?;
    assert_eq!(response.status(), 503);
    assert!(!response.headers().contains_key("retry-after"));
    fake.set_service_fault(None);
    assert_eq!(call(Some(valid)).await?.status(), 200);

    let statuses: Vec<u16> = fake.service_requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![401, 401, 401, 403, 200, 429, 503, 200]);
    Ok(())
}

/// What the router needs of the service: the demo backend's `/embed` behind the token check, the
/// token in `X-Serverless-Authorization` beside the application's own `Authorization`, and a
/// fault on routed requests that leaves the health check alone.
#[tokio::test]
async fn the_service_embeds_like_the_demo_backend_and_takes_x_serverless_authorization()
-> TestResult {
    let fake = FakeGcp::start(fast()).await?;
    let client = reqwest::Client::new();
    let valid = fake.shared.keys.sign(&token::id_token_claims(
        &fake.service_url(),
        "someone@demo-project.iam.gserviceaccount.com",
        Duration::from_secs(600),
    ));
    let wav = {
        // 16-bit mono PCM at 16 kHz, 10 ms of a ramp.
        let samples: Vec<i16> = (0..160).map(|i| i * 100).collect();
        let data: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        let mut wav = Vec::new();
        wav.extend_from_slice(b"RIFF");
        wav.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
        wav.extend_from_slice(b"WAVEfmt ");
        wav.extend_from_slice(&16u32.to_le_bytes());
        wav.extend_from_slice(&1u16.to_le_bytes());
        wav.extend_from_slice(&1u16.to_le_bytes());
        wav.extend_from_slice(&16_000u32.to_le_bytes());
        wav.extend_from_slice(&32_000u32.to_le_bytes());
        wav.extend_from_slice(&2u16.to_le_bytes());
        wav.extend_from_slice(&16u16.to_le_bytes());
        wav.extend_from_slice(b"data");
        wav.extend_from_slice(&(data.len() as u32).to_le_bytes());
        wav.extend_from_slice(&data);
        wav
    };
    let embed = |headers: Vec<(&'static str, String)>| {
        let mut request = client
            .post(format!("{}/embed", fake.service_url()))
            .body(wav.clone());
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request.send()
    };

    let response = embed(vec![("authorization", format!("Bearer {valid}"))]).await?;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await?;
    assert_eq!(body["dim"], 192, "{body}");
    assert_eq!(body["embedding"].as_array().map(Vec::len), Some(192));

    // The application's own Authorization passes; the ID token rides beside it.
    let response = embed(vec![
        ("authorization", "Bearer the-application-s-own".into()),
        ("x-serverless-authorization", format!("Bearer {valid}")),
    ])
    .await?;
    assert_eq!(response.status(), 200);
    // Without it, the application's token is what Cloud Run checks, and refuses.
    let response = embed(vec![(
        "authorization",
        "Bearer the-application-s-own".into(),
    )])
    .await?;
    assert_eq!(response.status(), 401);

    fake.set_request_fault(Some(ServiceFault {
        status: 503,
        retry_after: None,
    }));
    let response = embed(vec![("authorization", format!("Bearer {valid}"))]).await?;
    assert_eq!(response.status(), 503);
    let health = client
        .get(format!("{}/health", fake.service_url()))
        .bearer_auth(&valid)
        .send()
        .await?;
    assert_eq!(health.status(), 200, "probes pass during a request fault");
    fake.set_request_fault(None);

    let requests = fake.service_requests();
    let seen: Vec<(&str, &str, bool, u16)> = requests
        .iter()
        .map(|r| {
            (
                r.method.as_str(),
                r.path.as_str(),
                r.serverless_authorization,
                r.status,
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("POST", "/embed", false, 200),
            ("POST", "/embed", true, 200),
            ("POST", "/embed", false, 401),
            ("POST", "/embed", false, 503),
            ("GET", "/health", false, 200),
        ]
    );
    assert_eq!(
        requests[1].authorization.as_deref(),
        Some("Bearer the-application-s-own")
    );
    assert_eq!(requests[1].bearer.as_deref(), Some(valid.as_str()));
    Ok(())
}

#[tokio::test]
async fn a_public_service_needs_no_token() -> TestResult {
    let fake = FakeGcp::start(FakeOptions {
        service_requires_auth: false,
        ..fast()
    })
    .await?;
    let response = reqwest::get(format!("{}/health", fake.service_url())).await?;
    assert_eq!(response.status(), 200);
    Ok(())
}

#[tokio::test]
async fn dropping_the_fake_closes_even_pooled_connections() -> TestResult {
    let fake = FakeGcp::start(FakeOptions {
        service_requires_auth: false,
        ..fast()
    })
    .await?;
    fake.add_instance("vm-drop", &[]);
    let ip = fake.instances()[0].ip.clone().unwrap_or_default();
    let port = fake.vm_service_port();
    let url = format!("{}/health", fake.service_url());
    let client = reqwest::Client::new();
    assert_eq!(client.get(&url).send().await?.status(), 200);
    assert_eq!(
        client
            .get(format!("http://{ip}:{port}/health"))
            .send()
            .await?
            .status(),
        200
    );
    fake.shutdown().await;
    assert!(
        client.get(&url).send().await.is_err(),
        "service still answers after shutdown"
    );
    assert!(
        client
            .get(format!("http://{ip}:{port}/health"))
            .send()
            .await
            .is_err(),
        "VM still answers after shutdown"
    );
    Ok(())
}

#[tokio::test]
async fn a_retried_insert_with_the_same_request_id_gets_the_same_operation() -> TestResult {
    let fake = FakeGcp::start(fast()).await?;
    let (instances, _) = compute_clients(&fake).await;
    let insert = || {
        instances
            .insert()
            .set_project("demo-project")
            .set_zone("europe-west1-b")
            .set_request_id("0f6b3c2e-8a8d-4f39-9d55-1f4c7a3e2b10")
            .set_body(vm_body("retried"))
            .send()
    };
    let first = insert().await?;
    let second = insert().await?;
    assert_eq!(first.name, second.name);
    assert_eq!(fake.instances().len(), 1);
    Ok(())
}

/// The path the plan prescribes for service-account keys: google-cloud-auth's signer signs a
/// JWT-bearer assertion built by hand, posted to the key file's `token_uri`.
#[tokio::test]
async fn an_assertion_signed_by_google_cloud_auth_gets_an_id_token() -> TestResult {
    use base64::Engine;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let fake = FakeGcp::start(fast()).await?;
    let key = fake.service_account_key_json();
    let signer = google_cloud_auth::credentials::service_account::Builder::new(key.clone())
        .build_signer()?;
    let now = crate::server::unix_now();
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": key["private_key_id"]});
    let claims = json!({
        "iss": key["client_email"], "sub": key["client_email"], "aud": key["token_uri"],
        "target_audience": fake.service_url(), "iat": now, "exp": now + 3600,
    });
    let unsigned = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let signature = signer.sign(unsigned.as_bytes()).await?;
    let jwt = format!("{unsigned}.{}", b64(&signature));
    let (status, body) = post_token(&fake, JWT_BEARER, &jwt).await?;
    assert_eq!(status, 200, "{body}");
    let response = reqwest::Client::new()
        .get(format!("{}/health", fake.service_url()))
        .bearer_auth(body["id_token"].as_str().unwrap_or_default())
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    Ok(())
}

//! The Google Cloud tiers end to end: the real binary against the local
//! stand-ins of Cloud Run, Compute Engine, the metadata server and the token
//! endpoint (`cascade-gcp-fake`), which check every API request against
//! Google's discovery documents.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::Duration;

use cascade_gcp_fake::{FakeGcp, FakeOptions, ServiceFault};
use rand::Rng;
use serde_json::Value;
use tempfile::TempDir;

use crate::support::{
    BIN, Cascade, ConfigFile, SHORT, Setup, Signal, cli, free_port, poll, toml_str,
};

const POOL: &str = "ecapa";

pub(crate) async fn fake() -> FakeGcp {
    FakeGcp::start(FakeOptions {
        vm_service_port: free_port(),
        ..FakeOptions::default()
    })
    .await
    .expect("start the fake Google Cloud")
}

/// The environment a host on Google Cloud would give cascade: the metadata
/// server (here the fake's), and a home without gcloud credentials.
pub(crate) fn gcp_env(fake: &FakeGcp, home: &Path) -> Vec<(String, String)> {
    vec![
        ("GCE_METADATA_HOST".into(), fake.metadata_host()),
        ("HOME".into(), home.display().to_string()),
    ]
}

fn cloud_run_toml(fake: &FakeGcp) -> String {
    cloud_run_toml_with(fake, 3)
}

/// `failures`: the breaker's `consecutive_failures`.
fn cloud_run_toml_with(fake: &FakeGcp, failures: u32) -> String {
    let options = fake.options();
    format!(
        "[tiers.cloud_run]\n\
         url = {url}\n\
         cold_start_timeout = \"2s\"\n\
         probe = {{ interval = \"100ms\", timeout = \"500ms\" }}\n\
         breaker = {{ consecutive_failures = {failures}, open_base = \"300ms\", open_max = \"600ms\" }}\n\
         \n\
         [tiers.cloud_run.admin]\n\
         project = {project}\n\
         region = {region}\n\
         service = {service}\n\
         endpoint = {endpoint}\n\
         interval = \"1s\"\n",
        url = toml_str(&fake.service_url()),
        project = toml_str(&options.project),
        region = toml_str(&options.region),
        service = toml_str(&options.run_service),
        endpoint = toml_str(&fake.run_admin_endpoint()),
    )
}

fn gcp_vm_toml(fake: &FakeGcp, extra: &str) -> String {
    let options = fake.options();
    format!(
        "[tiers.gcp_vm]\n\
         project = {project}\n\
         zone = {zone}\n\
         pool = {pool}\n\
         endpoint = {endpoint}\n\
         service_port = {port}\n\
         max_vms = 2\n\
         watch_interval = \"100ms\"\n\
         operation_timeout = \"10s\"\n\
         probe = {{ interval = \"100ms\", timeout = \"1s\" }}\n\
         {extra}\n",
        project = toml_str(&options.project),
        zone = toml_str(&options.zone),
        pool = toml_str(POOL),
        endpoint = toml_str(&fake.compute_endpoint()),
        port = fake.vm_service_port(),
    )
}

pub(crate) fn tier(status: &Value, name: &str) -> Value {
    status["tiers"]
        .as_array()
        .and_then(|tiers| tiers.iter().find(|t| t["tier"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no {name} tier in status: {status}"))
}

pub(crate) async fn wait_active(cascade: &Cascade, name: &str, timeout: Duration) -> Value {
    let found = poll(timeout, async || {
        let status = cascade.status().await;
        if status["active"] == name {
            Ok(status)
        } else {
            Err(format!("active is {}: {status}", status["active"]))
        }
    })
    .await;
    cascade.or_fail(found, &format!("{name} to become the active tier"), timeout)
}

/// What the pool's checkpoint lists, by VM name.
fn checkpoint_vms(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read the checkpoint {}: {e}", path.display()));
    let json: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "the checkpoint {} is not JSON ({e}): {text}",
            path.display()
        )
    });
    let mut names: Vec<String> = json["vms"]
        .as_array()
        .unwrap_or_else(|| panic!("no vms in the checkpoint: {json}"))
        .iter()
        .filter_map(|vm| vm["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

fn checkpoint_path(cascade: &Cascade) -> PathBuf {
    cascade
        .state_dir
        .join("gcp_vm")
        .join(format!("{POOL}.json"))
}

/// VMs in the fake that carry the pool's label, by name.
fn pool_instances(fake: &FakeGcp) -> Vec<String> {
    let mut names: Vec<String> = fake
        .instances()
        .into_iter()
        .filter(|vm| vm.labels.get("cascade-pool").map(String::as_str) == Some(POOL))
        .map(|vm| vm.name)
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_cloud_run_503_storm_fails_over_to_local_and_back() {
    let fake = fake().await;
    let home = TempDir::new().expect("temp home");
    let setup = Setup {
        order: vec!["cloud_run".into(), "local".into()],
        waterfall: vec!["failback_after = \"1s\"".into()],
        env: gcp_env(&fake, home.path()),
        ..Setup::default()
    }
    .extra(&cloud_run_toml_with(&fake, 10));
    let cascade = Cascade::start(setup).await;
    let status = wait_active(&cascade, "cloud_run", SHORT).await;
    assert_eq!(
        tier(&status, "cloud_run")["endpoint"],
        fake.service_url(),
        "{status}"
    );

    fake.set_service_fault(Some(ServiceFault {
        status: 503,
        retry_after: None,
    }));
    let status = wait_active(&cascade, "local", SHORT).await;
    let cloud_run = tier(&status, "cloud_run");
    assert_eq!(cloud_run["state"], "unhealthy", "{cloud_run}");
    assert!(
        cloud_run["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("503")),
        "the error names the status: {cloud_run}"
    );
    // A 503 from Cloud Run is a definitive answer: the move does not wait for the breaker's
    // three failures, which follow as the storm goes on.
    let requests = fake.service_requests();
    let answered_503 = requests.iter().filter(|r| r.status == 503).count();
    assert!(
        answered_503 < 10,
        "failed over after {answered_503} 503s, as if waiting for the breaker; the first is enough"
    );
    let found = poll(SHORT, async || {
        let cloud_run = tier(&cascade.status().await, "cloud_run");
        if cloud_run["breaker"] != "closed" {
            Ok(())
        } else {
            Err(cloud_run.to_string())
        }
    })
    .await;
    cascade.or_fail(found, "the breaker to open as the storm goes on", SHORT);

    // Recovery goes through a half-open trial probe; once it passes, the
    // breaker closes and cascade fails back after `failback_after`.
    fake.set_service_fault(None);
    let status = wait_active(&cascade, "cloud_run", SHORT).await;
    assert_eq!(tier(&status, "cloud_run")["breaker"], "closed", "{status}");

    // Every probe carried an ID token for the service; none of them shows
    // up where an operator (or a log shipper) could read it.
    let requests = fake.service_requests();
    assert!(!requests.is_empty());
    let status_text = cascade.status().await.to_string();
    let logs = cascade.logs();
    for request in &requests {
        let token = request
            .bearer
            .as_deref()
            .expect("every probe sends a token");
        assert!(!status_text.contains(token), "a token leaked into /status");
        assert!(!logs.contains(token), "a token leaked into the log");
    }
    assert!(fake.rejections().is_empty(), "{:?}", fake.rejections());
}

#[tokio::test]
async fn a_cloud_run_service_that_is_not_ready_is_unavailable_with_its_message() {
    let fake = fake().await;
    fake.set_service_ready(
        false,
        "Revision 'ecapa-00042' is not ready: image not found",
    );
    let home = TempDir::new().expect("temp home");
    let setup = Setup {
        order: vec!["cloud_run".into(), "local".into()],
        env: gcp_env(&fake, home.path()),
        ..Setup::default()
    }
    .extra(&cloud_run_toml(&fake));
    let cascade = Cascade::start(setup).await;
    let status = wait_active(&cascade, "local", SHORT).await;
    let found = poll(SHORT, async || {
        let cloud_run = tier(&cascade.status().await, "cloud_run");
        if cloud_run["state"] == "unavailable"
            && cloud_run["reason"]
                .as_str()
                .is_some_and(|r| r.contains("image not found"))
        {
            Ok(())
        } else {
            Err(cloud_run.to_string())
        }
    })
    .await;
    cascade.or_fail(
        found,
        "cloud_run unavailable with the condition's message",
        SHORT,
    );
    assert_eq!(status["active"], "local");
}

/// An Admin API slower than a probe's whole timeout still gets its answer
/// into `/status`: the check runs on past the probe that started it.
#[tokio::test]
async fn an_admin_api_slower_than_the_probe_timeout_still_reports_not_ready() {
    let fake = fake().await;
    let message = "Revision 'ecapa-00043' is not ready: the image pull is slow";
    fake.set_service_ready(false, message);
    // The probe's timeout is 500 ms.
    fake.set_admin_latency(Duration::from_millis(1500));
    let home = TempDir::new().expect("temp home");
    let setup = Setup {
        order: vec!["cloud_run".into(), "local".into()],
        env: gcp_env(&fake, home.path()),
        ..Setup::default()
    }
    .extra(&cloud_run_toml(&fake));
    let cascade = Cascade::start(setup).await;
    let found = poll(SHORT, async || {
        let status = cascade.status().await;
        let cloud_run = tier(&status, "cloud_run");
        let reason = cloud_run["reason"].as_str().unwrap_or_default();
        if status["active"] == "local"
            && cloud_run["state"] == "unavailable"
            && reason.contains(message)
            && cloud_run["details"]["admin_ready"] == format!("false: {message}")
        {
            Ok(())
        } else {
            Err(status.to_string())
        }
    })
    .await;
    cascade.or_fail(
        found,
        "cloud_run unavailable with the slow Admin API's message",
        SHORT,
    );
}

/// gcp_vm is preferred here, and Cloud Run is down until the pool serves,
/// so the start phase creates the VM; a preemption then hands traffic to
/// Cloud Run at once, and the replacement takes it back after failback.
#[tokio::test]
async fn a_preempted_vm_hands_traffic_to_the_next_tier_and_is_replaced() {
    let fake = fake().await;
    fake.set_service_fault(Some(ServiceFault {
        status: 503,
        retry_after: None,
    }));
    let home = TempDir::new().expect("temp home");
    let setup = Setup {
        order: vec!["gcp_vm".into(), "cloud_run".into()],
        waterfall: vec!["failback_after = \"500ms\"".into()],
        env: gcp_env(&fake, home.path()),
        ..Setup::default()
    }
    .extra(&gcp_vm_toml(&fake, "vms = 1"))
    .extra(&cloud_run_toml(&fake));
    let cascade = Cascade::start(setup).await;
    wait_active(&cascade, "gcp_vm", SHORT).await;
    assert_eq!(pool_instances(&fake), [format!("{POOL}-0")]);
    fake.set_service_fault(None);
    let found = poll(SHORT, async || {
        let cloud_run = tier(&cascade.status().await, "cloud_run");
        if cloud_run["state"] == "healthy" {
            Ok(())
        } else {
            Err(cloud_run.to_string())
        }
    })
    .await;
    cascade.or_fail(found, "cloud_run healthy behind gcp_vm", SHORT);

    fake.preempt(&format!("{POOL}-0"));
    let status = wait_active(&cascade, "cloud_run", SHORT).await;
    assert!(
        tier(&status, "gcp_vm").to_string().contains("preempted"),
        "status says the VM was preempted: {status}"
    );

    // Replaced in the spare slot max_vms = 2 leaves, and preferred again once it serves; the
    // preempted VM is deleted.
    let status = wait_active(&cascade, "gcp_vm", SHORT).await;
    let gcp_vm = tier(&status, "gcp_vm");
    assert!(
        gcp_vm["backend_restarts"].as_u64() >= Some(1),
        "the replacement is counted: {gcp_vm}"
    );
    let found = poll(SHORT, async || {
        let names = pool_instances(&fake);
        if names == [format!("{POOL}-1")] {
            Ok(())
        } else {
            Err(format!("{names:?}"))
        }
    })
    .await;
    cascade.or_fail(found, "the replacement alone in the pool", SHORT);
    assert!(fake.rejections().is_empty(), "{:?}", fake.rejections());
}

/// SIGKILL at random moments while the pool creates its VMs (and writes its
/// checkpoint after each step); after every kill, the checkpoint is intact
/// and a restarted cascade reconciles: no VM is lost, none is created twice.
#[tokio::test]
async fn sigkilled_while_creating_vms_cascade_restarts_and_loses_no_vm() {
    let fake = fake().await;
    let home = TempDir::new().expect("temp home");
    let setup = Setup {
        order: vec!["gcp_vm".into()],
        env: gcp_env(&fake, home.path()),
        ..Setup::default()
    }
    .extra(&gcp_vm_toml(&fake, "vms = 2"));
    let mut cascade = Cascade::start(setup).await;
    let checkpoint = checkpoint_path(&cascade);
    let mut rng = rand::rng();
    for round in 0..6 {
        let delay = Duration::from_millis(rng.random_range(0..600));
        tokio::time::sleep(delay).await;
        cascade.signal(Signal::Kill);
        cascade
            .wait_exit(SHORT)
            .await
            .unwrap_or_else(|| panic!("round {round}: cascade survived SIGKILL"));
        let listed = if checkpoint.exists() {
            // Whatever moment the kill hit, the file is a whole state.
            let listed = checkpoint_vms(&checkpoint);
            assert!(listed.len() <= 2, "round {round}: {listed:?}");
            listed
        } else {
            Vec::new()
        };
        cascade.respawn().await;
        if !listed.is_empty() {
            // The new run starts from the file, before the API confirms it.
            let found = poll(SHORT, async || {
                let gcp_vm = tier(&cascade.status().await, "gcp_vm");
                let said = gcp_vm["details"]["checkpoint_at_start"]
                    .as_str()
                    .unwrap_or("");
                let wanted = format!("restored {} VMs from", listed.len());
                if said.starts_with(&wanted) {
                    Ok(())
                } else {
                    Err(format!("round {round}: {gcp_vm}"))
                }
            })
            .await;
            cascade.or_fail(found, "the pool restored from its checkpoint", SHORT);
        }
    }

    wait_active(&cascade, "gcp_vm", SHORT).await;
    let expected = vec![format!("{POOL}-0"), format!("{POOL}-1")];
    assert_eq!(
        pool_instances(&fake),
        expected,
        "the pool holds exactly its two VMs"
    );
    let found = poll(SHORT, async || {
        let listed = checkpoint_vms(&checkpoint);
        if listed == expected {
            Ok(())
        } else {
            Err(format!("{listed:?}"))
        }
    })
    .await;
    cascade.or_fail(found, "the checkpoint to list both VMs", SHORT);
    assert!(fake.rejections().is_empty(), "{:?}", fake.rejections());
}

#[tokio::test]
async fn a_corrupt_checkpoint_is_set_aside_and_the_pool_rebuilt_from_the_api() {
    let fake = fake().await;
    let home = TempDir::new().expect("temp home");
    let setup = Setup {
        order: vec!["gcp_vm".into()],
        env: gcp_env(&fake, home.path()),
        ..Setup::default()
    }
    .extra(&gcp_vm_toml(&fake, "vms = 1"));
    let mut cascade = Cascade::start(setup).await;
    wait_active(&cascade, "gcp_vm", SHORT).await;
    assert_eq!(pool_instances(&fake), [format!("{POOL}-0")]);

    // A crash that leaves garbage where the checkpoint was.
    cascade.signal(Signal::Kill);
    cascade
        .wait_exit(SHORT)
        .await
        .expect("cascade dies on SIGKILL");
    let checkpoint = checkpoint_path(&cascade);
    std::fs::write(&checkpoint, b"{\"version\": 1, \"vms\": [tru").expect("corrupt the checkpoint");
    let inserts = || {
        fake.compute_requests()
            .iter()
            .filter(|r| r.method_id == "compute.instances.insert")
            .count()
    };
    let inserted_before = inserts();
    cascade.respawn().await;
    wait_active(&cascade, "gcp_vm", SHORT).await;

    let dir = checkpoint.parent().expect("the checkpoint has a directory");
    let aside: Vec<String> = std::fs::read_dir(dir)
        .expect("read the checkpoint dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("corrupt"))
        .collect();
    assert_eq!(aside.len(), 1, "the corrupt file is kept aside: {aside:?}");
    assert!(
        cascade.logs().contains(&aside[0]),
        "the warning names where the file went: {}",
        cascade.log_tail()
    );
    // Rebuilt from instances.list: the VM was adopted, not created again.
    assert_eq!(pool_instances(&fake), [format!("{POOL}-0")]);
    assert_eq!(
        inserts(),
        inserted_before,
        "the adopted VM was not created again"
    );
    assert_eq!(checkpoint_vms(&checkpoint), [format!("{POOL}-0")]);
    assert!(fake.rejections().is_empty(), "{:?}", fake.rejections());
}

/// Renaming the pool by SIGHUP leaves no VM behind: the old pool is drained
/// (its VM deleted once idle for `idle_ttl`, its checkpoint removed) while
/// the renamed pool serves.
#[tokio::test]
async fn renaming_the_pool_by_sighup_drains_the_old_pool() {
    let fake = fake().await;
    let home = TempDir::new().expect("temp home");
    let setup = Setup {
        order: vec!["gcp_vm".into()],
        env: gcp_env(&fake, home.path()),
        ..Setup::default()
    }
    .extra(&gcp_vm_toml(&fake, "vms = 1\nidle_ttl = \"2s\""));
    let cascade = Cascade::start(setup).await;
    wait_active(&cascade, "gcp_vm", SHORT).await;
    assert_eq!(pool_instances(&fake), [format!("{POOL}-0")]);
    let old_checkpoint = checkpoint_path(&cascade);
    assert!(old_checkpoint.exists());

    cascade.edit_config(|text| {
        text.replace(&format!("pool = {}", toml_str(POOL)), "pool = \"renamed\"")
    });
    cascade.signal(Signal::Hup);
    let found = poll(SHORT, async || {
        let gcp_vm = tier(&cascade.status().await, "gcp_vm");
        match gcp_vm["details"][format!("retired.{POOL}")].as_str() {
            Some(text) if text.contains("no longer configured") => Ok(()),
            _ => Err(gcp_vm.to_string()),
        }
    })
    .await;
    cascade.or_fail(found, "the old pool shown as retired", SHORT);
    // The renamed pool serves; the old one's VM is deleted once idle and its
    // checkpoint removed.
    let found = poll(Duration::from_secs(30), async || {
        let names: Vec<String> = fake
            .instances()
            .into_iter()
            .filter(|vm| vm.status == "RUNNING")
            .map(|vm| vm.name)
            .collect();
        if names == ["renamed-0"] && !old_checkpoint.exists() {
            Ok(())
        } else {
            Err(format!(
                "{names:?}, old checkpoint exists: {}",
                old_checkpoint.exists()
            ))
        }
    })
    .await;
    cascade.or_fail(
        found,
        "the old VM deleted and its checkpoint removed",
        Duration::from_secs(30),
    );
    // The file goes first; /status shows the drain once the tier reports it.
    let found = poll(SHORT, async || {
        let gcp_vm = tier(&cascade.status().await, "gcp_vm");
        match gcp_vm["details"][format!("retired.{POOL}")].as_str() {
            Some(text) if text.contains("drained, checkpoint removed") => Ok(()),
            _ => Err(gcp_vm.to_string()),
        }
    })
    .await;
    cascade.or_fail(found, "the old pool shown as drained", SHORT);
    wait_active(&cascade, "gcp_vm", SHORT).await;
    assert!(fake.rejections().is_empty(), "{:?}", fake.rejections());
}

/// Taking `gcp_vm` out of the waterfall by SIGHUP leaves no VM behind: the
/// pool is drained as the tier stops (each VM's label and instance checked
/// first, as for idle deletion) and its checkpoint removed.
#[tokio::test]
async fn removing_the_gcp_vm_tier_by_sighup_deletes_its_vms_and_checkpoint() {
    let fake = fake().await;
    let home = TempDir::new().expect("temp home");
    let setup = Setup {
        order: vec!["gcp_vm".into(), "local".into()],
        env: gcp_env(&fake, home.path()),
        ..Setup::default()
    }
    .extra(&gcp_vm_toml(&fake, "vms = 1"));
    let cascade = Cascade::start(setup).await;
    wait_active(&cascade, "gcp_vm", SHORT).await;
    assert_eq!(pool_instances(&fake), [format!("{POOL}-0")]);
    let checkpoint = checkpoint_path(&cascade);
    assert_eq!(checkpoint_vms(&checkpoint), [format!("{POOL}-0")]);

    cascade
        .edit_config(|text| text.replace("order = [\"gcp_vm\", \"local\"]", "order = [\"local\"]"));
    cascade.signal(Signal::Hup);
    wait_active(&cascade, "local", SHORT).await;
    // The drain is logged after the checkpoint is removed, so wait for all three.
    let found = poll(SHORT, async || {
        let left = pool_instances(&fake);
        let logged = cascade.logs().contains("pool is drained");
        if left.is_empty() && !checkpoint.exists() && logged {
            Ok(())
        } else {
            Err(format!(
                "VMs left: {left:?}, checkpoint exists: {}, drain logged: {logged}",
                checkpoint.exists()
            ))
        }
    })
    .await;
    cascade.or_fail(
        found,
        "the removed tier's VM deleted, its checkpoint removed and the drain logged",
        SHORT,
    );
    assert!(fake.rejections().is_empty(), "{:?}", fake.rejections());
}

/// `cascade gcp_vm delete-pool NAME` lists by default, deletes with `--yes`
/// (only the VMs labelled with that pool, and its checkpoint), and refuses
/// the pool the configuration runs.
#[tokio::test]
async fn delete_pool_lists_then_deletes_with_yes() {
    let fake = fake().await;
    let home = TempDir::new().expect("temp home");
    fake.add_instance("old-0", &[("cascade-pool", "old")]);
    fake.add_instance("old-1", &[("cascade-pool", "old")]);
    fake.add_instance("other-0", &[("cascade-pool", "other")]);
    let state = TempDir::new().expect("temp state dir");
    let pool_dir = state.path().join("gcp_vm");
    std::fs::create_dir_all(&pool_dir).expect("pool dir");
    let checkpoint = pool_dir.join("old.json");
    let options = fake.options();
    std::fs::write(
        &checkpoint,
        serde_json::json!({
            "version": 1,
            "pool": "old",
            "project": options.project,
            "zone": options.zone,
            "vms": [],
        })
        .to_string(),
    )
    .expect("write a checkpoint");
    let config = ConfigFile::new(&gcp_vm_toml(&fake, "vms = 1"));
    let env: Vec<(String, String)> = gcp_env(&fake, home.path());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let state_dir = state.path().to_str().expect("UTF-8");
    let args = |extra: &[&'static str]| -> Vec<String> {
        let mut args: Vec<String> = ["gcp_vm", "delete-pool"]
            .into_iter()
            .chain(extra.iter().copied())
            .map(String::from)
            .collect();
        args.extend([
            "--config".into(),
            config.path_str().into(),
            "--state-dir".into(),
            state_dir.into(),
        ]);
        args
    };
    let run = async |extra: &[&'static str]| {
        let args = args(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&args, &env).await
    };

    let out = run(&["old"]).await;
    assert_eq!(out.code, Some(0), "{}", out.describe());
    for expected in ["old-0 RUNNING", "old-1 RUNNING", "old.json", "dry run"] {
        assert!(
            out.stdout.contains(expected),
            "{expected}: {}",
            out.describe()
        );
    }
    assert!(!out.stdout.contains("other-0"), "{}", out.describe());
    assert_eq!(fake.instances().len(), 3, "a dry run deletes nothing");
    assert!(checkpoint.exists());

    let out = run(&["old", "--yes"]).await;
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(out.stdout.contains("deleted old-0"), "{}", out.describe());
    assert!(out.stdout.contains("deleted old-1"), "{}", out.describe());
    let left: Vec<String> = fake.instances().into_iter().map(|vm| vm.name).collect();
    assert_eq!(left, ["other-0"]);
    assert!(!checkpoint.exists(), "the pool's checkpoint is removed");

    let out = run(&[POOL, "--yes"]).await;
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("is the pool tiers.gcp_vm configures"),
        "{}",
        out.describe()
    );
    assert!(fake.rejections().is_empty(), "{:?}", fake.rejections());
}

/// The `cascade-gcp-fake` binary, built beside cascade (`cargo test --test it`
/// builds only this package's binaries, so it is built here when missing).
fn fake_binary() -> PathBuf {
    static BUILT: Mutex<()> = Mutex::new(());
    let _once = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Path::new(BIN).parent().expect("the binary has a directory");
    let path = dir.join("cascade-gcp-fake");
    if path.exists() {
        return path;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args([
            "build",
            "-p",
            "cascade-gcp-fake",
            "--bin",
            "cascade-gcp-fake",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build");
    assert!(status.success(), "cargo build -p cascade-gcp-fake failed");
    assert!(path.exists(), "no {}", path.display());
    path
}

/// Kills and reaps a child process when the test ends, passed or not.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Seven free ports in a row, below the ephemeral range and above the ones
/// `free_port` hands out.
fn free_port_base() -> u16 {
    let start = 32_000 + (std::process::id() % 100) as u16 * 7;
    (0..100u16)
        .map(|i| 32_000 + (start - 32_000 + i * 7) % 700)
        .find(|base| (0..7).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()))
        .expect("seven free ports in a row")
}

/// The README's walk, with the binary fake driven over HTTP only: cascade on
/// the configuration the fake printed, a Cloud Run 503 storm fails over to
/// local and back, and a preempted VM is replaced.
#[tokio::test]
async fn the_fake_binary_driven_over_http_shows_failover_and_a_preempted_vm_replaced() {
    let base = free_port_base();
    let mut child: Child = Command::new(fake_binary())
        .args(["--port-base", &base.to_string()])
        .args(["--operation-delay-ms", "200", "--boot-delay-ms", "300"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run cascade-gcp-fake");
    let stdout = child.stdout.take().expect("stdout");
    let _fake = Reaped(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut printed = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let done = line.starts_with("Ctrl-C");
            printed.push_str(&line);
            printed.push('\n');
            if done {
                break;
            }
        }
        let _ = tx.send(printed);
    });
    let printed = rx
        .recv_timeout(SHORT)
        .expect("the fake prints its configuration");
    // The configuration as printed, its [waterfall] set by the harness.
    let snippet = printed
        .split_once("# cascade against cascade-gcp-fake")
        .map(|(_, rest)| rest)
        .and_then(|rest| rest.split_once("Ctrl-C"))
        .map(|(config, _)| format!("# cascade against cascade-gcp-fake{config}"))
        .unwrap_or_else(|| panic!("no configuration printed: {printed}"));
    let snippet = snippet
        .replace("order = [\"cloud_run\", \"local\", \"gcp_vm\"]\n", "")
        .replace("failback_after = \"10s\"\n", "")
        .replace("[waterfall]\n", "");
    let metadata = format!("127.0.0.1:{}", base + 2);
    assert!(
        printed.contains(&format!("GCE_METADATA_HOST={metadata}")),
        "{printed}"
    );
    let home = TempDir::new().expect("temp home");
    let setup = Setup {
        order: vec!["cloud_run".into(), "local".into(), "gcp_vm".into()],
        waterfall: vec!["failback_after = \"1s\"".into()],
        env: vec![
            ("GCE_METADATA_HOST".into(), metadata),
            ("HOME".into(), home.path().display().to_string()),
        ],
        ..Setup::default()
    }
    .extra(&snippet);
    let cascade = Cascade::start(setup).await;
    wait_active(&cascade, "cloud_run", SHORT).await;

    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let control = format!("http://127.0.0.1:{}", base + 5);
    let knob = async |method: reqwest::Method, path: &str| {
        let reply = http
            .request(method, format!("{control}{path}"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = reply.status();
        let text = reply.text().await.unwrap_or_default();
        assert!(status.is_success(), "{path}: {status} {text}");
        text
    };
    knob(
        reqwest::Method::POST,
        "/service/fault?status=503&retry_after=2",
    )
    .await;
    let status = wait_active(&cascade, "local", SHORT).await;
    assert!(
        tier(&status, "cloud_run").to_string().contains("503"),
        "{status}"
    );
    knob(reqwest::Method::DELETE, "/service/fault").await;
    wait_active(&cascade, "cloud_run", SHORT).await;

    // A VM by hand, then preempted: the pool replaces it.
    let out = cli(
        &[
            "restart",
            "gcp_vm",
            "--config",
            cascade.config_path.to_str().expect("UTF-8"),
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let running = |state: &str, name: &str| {
        state
            .lines()
            .any(|l| l.starts_with(&format!("{name} RUNNING ")))
    };
    let state = knob(reqwest::Method::GET, "/state").await;
    assert!(running(&state, "ecapa-0"), "{state}");
    knob(reqwest::Method::POST, "/compute/preempt?instance=ecapa-0").await;
    let found = poll(SHORT, async || {
        let state = knob(reqwest::Method::GET, "/state").await;
        let gcp_vm = tier(&cascade.status().await, "gcp_vm");
        let restarts = gcp_vm["backend_restarts"].as_u64().unwrap_or(0);
        if running(&state, "ecapa-1") && !state.contains("ecapa-0") && restarts >= 1 {
            Ok(())
        } else {
            Err(format!("{state}\n{gcp_vm}"))
        }
    })
    .await;
    cascade.or_fail(
        found,
        "the preempted VM replaced, the old one deleted",
        SHORT,
    );
    assert_eq!(
        cascade.status().await["active"],
        "cloud_run",
        "cloud_run still serves"
    );
}

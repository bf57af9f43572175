//! What a proxy does to headers on the way through (RFC 9110 §7.6): drops
//! the hop-by-hop ones (and those a `Connection` header names), adds
//! `Forwarded` and the `X-Forwarded-*` family, and leaves the rest —
//! `traceparent` included — as the client sent them.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers: they describe one connection, not the message.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_CASCADE_TIER: HeaderName = HeaderName::from_static("x-cascade-tier");
pub const X_CASCADE_ATTEMPTS: HeaderName = HeaderName::from_static("x-cascade-attempts");
pub const X_SERVERLESS_AUTHORIZATION: HeaderName =
    HeaderName::from_static("x-serverless-authorization");

/// Removes hop-by-hop headers, those named in `Connection` first.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// The request headers for an upstream: hop-by-hop ones removed, `Host`
/// left to the client (set from the upstream URL), the forwarding headers
/// added. `te: trailers` survives, as gRPC needs it end to end.
pub fn upstream_request(headers: &mut HeaderMap, client: SocketAddr, proto: &str) {
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    strip_hop_by_hop(headers);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let host = headers.remove(header::HOST);
    // Credentials for Cloud Run are cascade's to set, never the client's.
    headers.remove(X_SERVERLESS_AUTHORIZATION);

    let ip = client.ip().to_canonical();
    let node = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    let mut forwarded = format!("for={node};proto={proto}");
    if let Some(host) = host.as_ref().and_then(|h| h.to_str().ok()) {
        forwarded.push_str(&format!(";host=\"{}\"", host.replace(['"', '\\'], "")));
    }
    append_list(headers, header::FORWARDED, &forwarded);
    append_list(headers, X_FORWARDED_FOR, &ip.to_string());
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if proto == "https" { "https" } else { "http" }),
    );
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host);
    }
}

/// Appends `item` to a comma-separated list header, creating it if absent.
fn append_list(headers: &mut HeaderMap, name: HeaderName, item: &str) {
    let joined = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.trim().is_empty() => format!("{existing}, {item}"),
        _ => item.to_owned(),
    };
    match HeaderValue::from_str(&joined) {
        Ok(value) => {
            headers.insert(name, value);
        }
        // An existing value we cannot extend is replaced by ours alone.
        Err(_) => {
            if let Ok(value) = HeaderValue::from_str(item) {
                headers.insert(name, value);
            }
        }
    }
}

/// Marks a response with the tier that answered and the tries it took.
pub fn mark(headers: &mut HeaderMap, tier: &str, attempts: u32) {
    headers.insert(
        X_CASCADE_TIER,
        HeaderValue::from_str(tier).unwrap_or(HeaderValue::from_static("none")),
    );
    headers.insert(X_CASCADE_ATTEMPTS, HeaderValue::from(attempts));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic abc"),
            ("te", "gzip"),
            ("trailer", "x-checksum"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            ("content-type", "audio/wav"),
        ]);
        upstream_request(&mut h, "127.0.0.1:5000".parse().unwrap(), "http");
        for gone in [
            "connection",
            "keep-alive",
            "x-secret-hop",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "te",
            "trailer",
        ] {
            assert!(h.get(gone).is_none(), "{gone} survived");
        }
        assert_eq!(
            h["traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert_eq!(h["content-type"], "audio/wav");
    }

    #[test]
    fn forwarding_headers_are_appended() {
        let mut h = headers(&[
            ("host", "cascade.local:8700"),
            ("x-forwarded-for", "10.1.1.1"),
            ("te", "trailers"),
            ("x-serverless-authorization", "Bearer forged"),
        ]);
        upstream_request(&mut h, "[::1]:5000".parse().unwrap(), "http");
        assert_eq!(h["x-forwarded-for"], "10.1.1.1, ::1");
        assert_eq!(
            h["forwarded"],
            "for=\"[::1]\";proto=http;host=\"cascade.local:8700\""
        );
        assert_eq!(h["x-forwarded-host"], "cascade.local:8700");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(h.get("host").is_none(), "Host is set per upstream");
        assert_eq!(h["te"], "trailers");
        assert!(h.get("x-serverless-authorization").is_none());
    }

    #[test]
    fn mapped_ipv4_clients_read_as_ipv4() {
        let mut h = HeaderMap::new();
        upstream_request(&mut h, "[::ffff:127.0.0.1]:5000".parse().unwrap(), "http");
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http");
    }
}

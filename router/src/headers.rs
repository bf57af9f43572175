//! What a proxy does to headers on the way through (RFC 9110 §7.6): drops
//! the hop-by-hop ones (and those a `Connection` header names), adds
//! `Forwarded` and the `X-Forwarded-*` family, and leaves the rest —
//! `traceparent` included — as the client sent them.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers: they describe one connection, not the message.
/// Names, not strings: removing by `&str` parses the name on every request.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
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
    // Most messages carry none: one pass over their few names is cheaper
    // than a lookup per hop-by-hop name.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
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
    for name in &HOP_BY_HOP {
        headers.remove(name);
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
    let address = ip.to_string();
    let mut forwarded = String::with_capacity(64);
    forwarded.push_str("for=");
    match ip {
        IpAddr::V4(_) => forwarded.push_str(&address),
        IpAddr::V6(_) => {
            forwarded.push_str("\"[");
            forwarded.push_str(&address);
            forwarded.push_str("]\"");
        }
    }
    forwarded.push_str(";proto=");
    forwarded.push_str(proto);
    if let Some(host) = host.as_ref().and_then(|h| h.to_str().ok()) {
        forwarded.push_str(";host=\"");
        forwarded.extend(host.chars().filter(|c| !matches!(c, '"' | '\\')));
        forwarded.push('"');
    }
    append_list(headers, header::FORWARDED, forwarded);
    append_list(headers, X_FORWARDED_FOR, address);
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if proto == "https" { "https" } else { "http" }),
    );
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host);
    }
}

/// Appends `item` to a comma-separated list header, creating it if absent.
/// The common case (no such header yet) moves `item` into the value
/// without copying it.
fn append_list(headers: &mut HeaderMap, name: HeaderName, item: String) {
    let joined = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.trim().is_empty() => Some(format!("{existing}, {item}")),
        _ => None,
    };
    let value = match joined {
        Some(joined) => HeaderValue::from_maybe_shared(Bytes::from(joined))
            // An existing value we cannot extend is replaced by ours alone.
            .or_else(|_| HeaderValue::from_maybe_shared(Bytes::from(item))),
        None => HeaderValue::from_maybe_shared(Bytes::from(item)),
    };
    if let Ok(value) = value {
        headers.insert(name, value);
    }
}

/// Marks a response with the tier that answered and the tries it took.
pub fn mark(headers: &mut HeaderMap, tier: &'static str, attempts: u32) {
    headers.insert(X_CASCADE_TIER, HeaderValue::from_static(tier));
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

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

/// Whether `name` is one of [`HOP_BY_HOP`]: one comparison of its text by
/// length and bytes, not nine of names.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// What one pass over a request's headers finds: which of those the router
/// acts on are present, so that an absent one costs no lookup. A lookup
/// hashes the name and probes the map, about 250 instructions; most
/// requests carry none of these but `Host`.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// A hop-by-hop header (`TE` and `Upgrade` included).
    pub hop_by_hop: bool,
    pub upgrade: bool,
    pub authorization: bool,
    /// The first `Content-Length` that parses.
    pub content_length: Option<u64>,
    /// The client's first `Host`: a copy of the value, so that no lookup
    /// (or removal) is needed to forward it, as the router replaces the
    /// header itself with each upstream's.
    pub host: Option<HeaderValue>,
    serverless_authorization: bool,
    forwarded: bool,
    x_forwarded_for: bool,
}

impl Seen {
    pub fn scan(headers: &HeaderMap) -> Seen {
        let mut seen = Seen::default();
        for (name, value) in headers {
            match name.as_str() {
                "upgrade" => {
                    seen.upgrade = true;
                    seen.hop_by_hop = true;
                }
                "host" if seen.host.is_none() => seen.host = Some(value.clone()),
                "authorization" => seen.authorization = true,
                "content-length" if seen.content_length.is_none() => {
                    seen.content_length = value.to_str().ok().and_then(|v| v.trim().parse().ok());
                }
                "x-serverless-authorization" => seen.serverless_authorization = true,
                "forwarded" => seen.forwarded = true,
                "x-forwarded-for" => seen.x_forwarded_for = true,
                _ if is_hop_by_hop(name) => seen.hop_by_hop = true,
                _ => {}
            }
        }
        seen
    }
}

/// Removes hop-by-hop headers, those named in `Connection` first.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over their few names is cheaper
    // than a lookup per hop-by-hop name.
    if !headers.keys().any(is_hop_by_hop) {
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

/// One client connection, as the forwarding headers name it: made once
/// per connection, so that a request on it copies header values (a
/// reference count each) instead of formatting the address again.
pub struct Client {
    /// `X-Forwarded-For`'s item: the address alone.
    address: HeaderValue,
    /// `Forwarded`'s `for=` element (an IPv6 address quoted, in brackets).
    for_element: String,
    /// The last `Forwarded` value made, and the `Host` and scheme it was
    /// made for: a connection's requests usually name one host.
    forwarded: std::sync::Mutex<Option<(Option<HeaderValue>, &'static str, HeaderValue)>>,
}

impl Client {
    pub fn new(client: SocketAddr) -> Client {
        let ip = client.ip().to_canonical();
        let address = ip.to_string();
        let for_element = match ip {
            IpAddr::V4(_) => format!("for={address}"),
            IpAddr::V6(_) => format!("for=\"[{address}]\""),
        };
        Client {
            address: HeaderValue::from_maybe_shared(Bytes::from(address))
                .expect("an IP address is a valid header value"),
            for_element,
            forwarded: std::sync::Mutex::new(None),
        }
    }

    /// The `Forwarded` element for a request that came with `host` over
    /// `proto`.
    fn forwarded(&self, host: Option<&HeaderValue>, proto: &'static str) -> HeaderValue {
        let mut last = self
            .forwarded
            .lock()
            // Nothing under this lock can panic.
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((last_host, last_proto, value)) = &*last
            && last_host.as_ref() == host
            && *last_proto == proto
        {
            return value.clone();
        }
        let mut forwarded = String::with_capacity(64);
        forwarded.push_str(&self.for_element);
        forwarded.push_str(";proto=");
        forwarded.push_str(proto);
        if let Some(host) = host.and_then(|h| h.to_str().ok()) {
            forwarded.push_str(";host=\"");
            forwarded.extend(host.chars().filter(|c| !matches!(c, '"' | '\\')));
            forwarded.push('"');
        }
        let value = HeaderValue::from_maybe_shared(Bytes::from(forwarded))
            // Made of an address, a scheme and a visible-ASCII host.
            .unwrap_or_else(|_| HeaderValue::from_static("for=unknown"));
        // A copy, not the request's value: that one is a slice of the
        // connection's read buffer, which it would keep from being reused.
        let host = host.and_then(|h| HeaderValue::from_bytes(h.as_bytes()).ok());
        *last = Some((host, proto, value.clone()));
        value
    }
}

/// The request headers for an upstream: hop-by-hop ones removed, the
/// forwarding headers added. `Host` stays as the client sent it: the caller
/// replaces it with each upstream's (from its URL) before that try.
/// `te: trailers` survives, as gRPC needs it end to end. `seen` is
/// [`Seen::scan`] of `headers`.
pub fn upstream_request(
    headers: &mut HeaderMap,
    seen: &Seen,
    client: &Client,
    proto: &'static str,
) {
    if seen.hop_by_hop {
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
    }
    let host = seen.host.clone();
    // Credentials for Cloud Run are cascade's to set, never the client's.
    if seen.serverless_authorization {
        headers.remove(X_SERVERLESS_AUTHORIZATION);
    }

    let forwarded = client.forwarded(host.as_ref(), proto);
    if seen.forwarded {
        append_list(headers, header::FORWARDED, forwarded);
    } else {
        headers.insert(header::FORWARDED, forwarded);
    }
    if seen.x_forwarded_for {
        append_list(headers, X_FORWARDED_FOR, client.address.clone());
    } else {
        headers.insert(X_FORWARDED_FOR, client.address.clone());
    }
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if proto == "https" { "https" } else { "http" }),
    );
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host);
    }
}

/// Appends `item` to a comma-separated list header, creating it if absent.
fn append_list(headers: &mut HeaderMap, name: HeaderName, item: HeaderValue) {
    let joined = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.trim().is_empty() => {
            let mut joined = Vec::with_capacity(existing.len() + 2 + item.len());
            joined.extend_from_slice(existing.as_bytes());
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(item.as_bytes());
            // An existing value we cannot extend is replaced by ours alone.
            HeaderValue::from_maybe_shared(Bytes::from(joined)).ok()
        }
        _ => None,
    };
    headers.insert(name, joined.unwrap_or(item));
}

/// Marks a response with the tier that answered and the tries it took.
pub fn mark(headers: &mut HeaderMap, tier: &'static str, attempts: u32) {
    // Static values for the usual counts: formatting one allocates. A
    // match, not an array of them: a `const` array is built (and dropped)
    // whole at every use.
    let count = match attempts {
        0 => HeaderValue::from_static("0"),
        1 => HeaderValue::from_static("1"),
        2 => HeaderValue::from_static("2"),
        3 => HeaderValue::from_static("3"),
        4 => HeaderValue::from_static("4"),
        5 => HeaderValue::from_static("5"),
        n => HeaderValue::from(n),
    };
    headers.insert(X_CASCADE_TIER, HeaderValue::from_static(tier));
    headers.insert(X_CASCADE_ATTEMPTS, count);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `h` as sent upstream for a request from `client` over `proto`, with
    /// `Host` set to the upstream's as the router does before each try.
    fn forward(h: &mut HeaderMap, client: &Client, proto: &'static str) {
        let seen = Seen::scan(h);
        upstream_request(h, &seen, client, proto);
        h.insert(header::HOST, HeaderValue::from_static(UPSTREAM));
    }

    const UPSTREAM: &str = "upstream.internal:8080";

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
    fn one_scan_finds_the_headers_the_router_acts_on() {
        let seen = Seen::scan(&headers(&[
            ("host", "a"),
            ("content-length", " 12 "),
            ("content-length", "12"),
            ("authorization", "Bearer mine"),
        ]));
        assert_eq!(seen.content_length, Some(12));
        assert_eq!(seen.host.as_ref().unwrap(), "a");
        assert!(seen.authorization);
        assert!(!seen.upgrade && !seen.hop_by_hop);
        assert!(!seen.forwarded && !seen.x_forwarded_for && !seen.serverless_authorization);

        let seen = Seen::scan(&headers(&[
            ("Upgrade", "websocket"),
            ("x-serverless-authorization", "Bearer forged"),
            ("forwarded", "for=10.0.0.1"),
            ("x-forwarded-for", "10.0.0.1"),
            ("content-length", "many"),
        ]));
        assert!(seen.upgrade && seen.hop_by_hop);
        assert!(seen.serverless_authorization && seen.forwarded && seen.x_forwarded_for);
        assert_eq!(seen.content_length, None);
        assert!(seen.host.is_none());
        assert!(Seen::scan(&headers(&[("te", "trailers")])).hop_by_hop);
    }

    #[test]
    fn a_client_s_serverless_authorization_never_goes_upstream() {
        let mut h = headers(&[
            ("x-serverless-authorization", "Bearer forged"),
            ("host", "a"),
        ]);
        forward(
            &mut h,
            &Client::new("127.0.0.1:5000".parse().unwrap()),
            "http",
        );
        assert!(!h.contains_key(X_SERVERLESS_AUTHORIZATION));
        assert_eq!(h[header::HOST], UPSTREAM);
        assert_eq!(h["x-forwarded-host"], "a");
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
        forward(
            &mut h,
            &Client::new("127.0.0.1:5000".parse().unwrap()),
            "http",
        );
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
        forward(&mut h, &Client::new("[::1]:5000".parse().unwrap()), "http");
        assert_eq!(h["x-forwarded-for"], "10.1.1.1, ::1");
        assert_eq!(
            h["forwarded"],
            "for=\"[::1]\";proto=http;host=\"cascade.local:8700\""
        );
        assert_eq!(h["x-forwarded-host"], "cascade.local:8700");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["host"], UPSTREAM, "Host is set per upstream");
        assert_eq!(h["te"], "trailers");
        assert!(h.get("x-serverless-authorization").is_none());
    }

    #[test]
    fn a_connection_s_forwarded_value_follows_each_request_s_host() {
        let client = Client::new("10.0.0.7:5000".parse().unwrap());
        for (host, proto, expected) in [
            (
                "a.example",
                "http",
                "for=10.0.0.7;proto=http;host=\"a.example\"",
            ),
            (
                "a.example",
                "http",
                "for=10.0.0.7;proto=http;host=\"a.example\"",
            ),
            (
                "b.example",
                "http",
                "for=10.0.0.7;proto=http;host=\"b.example\"",
            ),
            (
                "b.example",
                "https",
                "for=10.0.0.7;proto=https;host=\"b.example\"",
            ),
        ] {
            let mut h = headers(&[("host", host)]);
            forward(&mut h, &client, proto);
            assert_eq!(h["forwarded"], expected);
            assert_eq!(h["x-forwarded-for"], "10.0.0.7");
        }
        let mut h = HeaderMap::new();
        forward(&mut h, &client, "http");
        assert_eq!(h["forwarded"], "for=10.0.0.7;proto=http");
    }

    #[test]
    fn attempts_are_marked_past_the_static_counts() {
        let mut h = HeaderMap::new();
        mark(&mut h, "local", 3);
        assert_eq!(h["x-cascade-attempts"], "3");
        mark(&mut h, "local", 12);
        assert_eq!(h["x-cascade-attempts"], "12");
        assert_eq!(h["x-cascade-tier"], "local");
    }

    #[test]
    fn mapped_ipv4_clients_read_as_ipv4() {
        let mut h = HeaderMap::new();
        forward(
            &mut h,
            &Client::new("[::ffff:127.0.0.1]:5000".parse().unwrap()),
            "http",
        );
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http");
    }
}

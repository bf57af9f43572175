//! Who holds a host port, for the tiers that publish or serve on one (docker,
//! local): a bind test, and Linux's `/proc` to name the process behind a
//! listening socket or to check that it belongs to a given process group.
//!
//! Reading `/proc` means walking `/proc/*/fd`, which takes a while on a busy
//! host, so every lookup runs on the blocking pool (`spawn_blocking`) under
//! the caller's deadline and never on a runtime worker. A lookup that runs
//! out of time is abandoned, not cancelled: its thread finishes the walk and
//! its answer is dropped.
//!
//! Invariant: reads are bounded (each `/proc/net` table is read up to
//! [`TABLE_LIMIT`]); nothing here changes anything.
//! Elsewhere than Linux the lookups find nothing (`None`, an empty list,
//! [`Serving::Unknown`]).

use std::collections::BTreeSet;
use std::fmt;
use std::io::{self, BufRead, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::time::Duration;

use crate::resilience::with_deadline;

/// Most of one `/proc/net/{tcp,udp}[6]` table read (150 bytes a socket:
/// about 200,000 sockets); a larger table is cut, not refused. A TCP table
/// is read only up to its first row that is not listening: the kernel
/// lists its listening hash before the established one (`tcp_get_idx` in
/// `net/ipv4/tcp_ipv4.c`), so the thousands of connections of a busy host
/// (whose rows the kernel prints a page per read) are not read at all.
pub const TABLE_LIMIT: u64 = 32 * 1024 * 1024;

/// TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn udp(udp: bool) -> Protocol {
        if udp { Protocol::Udp } else { Protocol::Tcp }
    }

    fn tables(self) -> [&'static str; 2] {
        match self {
            Protocol::Tcp => ["/proc/net/tcp", "/proc/net/tcp6"],
            Protocol::Udp => ["/proc/net/udp", "/proc/net/udp6"],
        }
    }
}

/// A process holding a socket: `pid 4242 (nginx)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// Its process group.
    pub pgid: u32,
    /// Its command name (`comm`), at most 15 bytes.
    pub name: String,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.name)
    }
}

/// Who answers connections to `127.0.0.1:port`, seen from one process group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serving {
    /// Every listening socket that accepts on `127.0.0.1:port` is held by a
    /// process of the group.
    ByGroup,
    /// Nothing listens there.
    Nobody,
    /// A socket that accepts there is held outside the group: by these
    /// processes, or (empty) by one cascade may not look into (another
    /// user's).
    Others(Vec<Holder>),
    /// Not known on this system (no `/proc`).
    Unknown,
}

/// Why a lookup has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("looking up who holds port {port} took longer than {}", crate::text::duration(*after))]
    TimedOut { port: u16, after: Duration },
    #[error("looking up who holds port {port} failed: {reason}")]
    Failed { port: u16, reason: String },
}

/// Why cascade cannot bind `port` on 127.0.0.1, which is where Docker
/// publishes it and where the local tier's process serves; `None` when it
/// can. A listener on 0.0.0.0 or a dual-stack `[::]` holds 127.0.0.1 too, so
/// this one bind sees them; a listener on some other specific address does
/// not collide and is rightly not reported. Binding is one system call:
/// cheap enough for a runtime worker.
pub fn bind_error(port: u16, protocol: Protocol) -> Option<io::Error> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let bound = match protocol {
        Protocol::Udp => UdpSocket::bind(addr).map(drop),
        Protocol::Tcp => TcpListener::bind(addr).map(drop),
    };
    bound.err()
}

/// The first process found holding a socket bound to `port` (listening, for
/// TCP), for error messages: best effort, `None` on any obstacle, including
/// the deadline.
pub async fn owner(port: u16, protocol: Protocol, within: Duration) -> Option<Holder> {
    holders(port, protocol, within)
        .await
        .ok()
        .and_then(|h| h.into_iter().next())
}

/// Every process holding a socket bound to `port` (listening, for TCP) that
/// cascade may look into.
pub async fn holders(
    port: u16,
    protocol: Protocol,
    within: Duration,
) -> Result<Vec<Holder>, PortError> {
    off_runtime(port, within, move || {
        let inodes = socket_inodes(protocol, port, |_| true);
        Ok(find_holders(&inodes, None))
    })
    .await
}

/// Whether the sockets that accept TCP connections on `127.0.0.1:port` all
/// belong to process group `pgid`.
pub async fn served_by_group(port: u16, pgid: u32, within: Duration) -> Result<Serving, PortError> {
    off_runtime(port, within, move || Ok(serving(port, pgid))).await
}

async fn off_runtime<T: Send + 'static>(
    port: u16,
    within: Duration,
    work: impl FnOnce() -> Result<T, PortError> + Send + 'static,
) -> Result<T, PortError> {
    let task = tokio::task::spawn_blocking(work);
    match with_deadline(within, "port lookup", task).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(join)) => Err(PortError::Failed {
            port,
            reason: join.to_string(),
        }),
        Err(_) => Err(PortError::TimedOut {
            port,
            after: within,
        }),
    }
}

fn serving(port: u16, pgid: u32) -> Serving {
    if !Path::new("/proc/net/tcp").exists() {
        return Serving::Unknown;
    }
    let mut wanted = socket_inodes(Protocol::Tcp, port, accepts_loopback_v4);
    if wanted.is_empty() {
        return Serving::Nobody;
    }
    // The leader first: as a rule it exec'd the service and holds the
    // socket, so the common case reads one process's fds and no more.
    let member = |pid: u32| stat(pid).is_some_and(|s| s.pgrp == pgid && !s.is_zombie());
    let leader = std::iter::once(pgid).filter(|&pid| member(pid));
    let others = || pids().into_iter().filter(|&pid| pid != pgid && member(pid));
    // `flat_map` is lazy: /proc is listed only if the leader is not enough.
    for pid in leader.chain(std::iter::once(()).flat_map(|()| others())) {
        for inode in fd_inodes(pid) {
            wanted.remove(&inode);
        }
        if wanted.is_empty() {
            return Serving::ByGroup;
        }
    }
    Serving::Others(find_holders(&wanted, Some(pgid)))
}

/// Whether a socket bound to `ip` accepts connections to 127.0.0.1.
fn accepts_loopback_v4(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4 == Ipv4Addr::LOCALHOST || v4.is_unspecified(),
        // `[::]` is dual-stack unless IPV6_V6ONLY, which /proc does not show:
        // counted as accepting, so a stranger there is never overlooked.
        IpAddr::V6(v6) => {
            v6.is_unspecified()
                || v6 == Ipv4Addr::LOCALHOST.to_ipv6_mapped()
                || v6 == Ipv4Addr::UNSPECIFIED.to_ipv6_mapped()
        }
    }
}

/// Inodes of the sockets bound to `port` at an address `keep` accepts:
/// listening (state 0A) for TCP, any state for UDP.
fn socket_inodes(protocol: Protocol, port: u16, keep: impl Fn(IpAddr) -> bool) -> BTreeSet<u64> {
    protocol
        .tables()
        .iter()
        .filter_map(|table| std::fs::File::open(table).ok())
        .flat_map(|file| {
            let reader = io::BufReader::with_capacity(64 * 1024, file.take(TABLE_LIMIT));
            bound_sockets(reader, protocol == Protocol::Udp)
        })
        .filter(|s| s.port == port && keep(s.ip))
        .map(|s| s.inode)
        .collect()
}

fn read_capped(path: &Path, limit: u64) -> io::Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(limit)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// One row of a `/proc/net` socket table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Socket {
    ip: IpAddr,
    port: u16,
    inode: u64,
}

/// The bound sockets of a `/proc/net/{tcp,udp}[6]` table: listening ones
/// for TCP (read up to the first row that is not: see [`TABLE_LIMIT`]),
/// all for UDP. Rows that do not parse are skipped.
fn bound_sockets(table: impl BufRead, udp: bool) -> Vec<Socket> {
    let mut sockets = Vec::new();
    for line in table.lines().skip(1) {
        let Ok(line) = line else { break };
        let Some((socket, listening)) = parse_row(&line) else {
            continue;
        };
        if !udp && !listening {
            break;
        }
        if socket.inode != 0 {
            sockets.push(socket);
        }
    }
    sockets
}

/// One row: the socket, and whether it is in state LISTEN (`0A`).
fn parse_row(line: &str) -> Option<(Socket, bool)> {
    let mut fields = line.split_whitespace();
    let local = fields.nth(1)?;
    let state = fields.nth(1)?;
    let inode = fields.nth(5)?.parse::<u64>().ok()?;
    let (hex_ip, hex_port) = local.rsplit_once(':')?;
    let port = u16::from_str_radix(hex_port, 16).ok()?;
    let ip = parse_ip(hex_ip)?;
    Some((Socket { ip, port, inode }, state == "0A"))
}

/// The kernel prints an address as 32-bit words in host byte order.
fn parse_ip(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// Pids of `/proc`, in no particular order.
fn pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .collect()
}

/// The live processes of group `pgid` (zombies hold nothing and only wait
/// to be reaped): its leader first when it still runs.
pub(crate) fn group_members(pgid: u32) -> Vec<u32> {
    let member = |pid: u32| stat(pid).is_some_and(|s| s.pgrp == pgid && !s.is_zombie());
    let mut members: Vec<u32> = Vec::new();
    if member(pgid) {
        members.push(pgid);
    }
    members.extend(pids().into_iter().filter(|&pid| pid != pgid && member(pid)));
    members
}

/// Socket inodes among `pid`'s open files; empty when it cannot be read.
fn fd_inodes(pid: u32) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|fd| {
            let target = std::fs::read_link(fd.path()).ok()?;
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// The processes holding any of `inodes`, outside group `skip`.
fn find_holders(inodes: &BTreeSet<u64>, skip: Option<u32>) -> Vec<Holder> {
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut found = Vec::new();
    for pid in pids() {
        let Some(stat) = stat(pid) else { continue };
        if Some(stat.pgrp) == skip {
            continue;
        }
        if fd_inodes(pid).iter().any(|i| inodes.contains(i)) {
            found.push(Holder {
                pid,
                pgid: stat.pgrp,
                name: stat.comm,
            });
        }
    }
    found.sort_by_key(|h| h.pid);
    found
}

/// What `/proc/PID/stat` says of a process, as far as cascade asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stat {
    pub comm: String,
    /// `R`, `S`, `T` (stopped by a signal), `Z` (zombie), ...
    pub state: char,
    pub pgrp: u32,
    /// Clock ticks after boot when it started: with the pid, what names
    /// one process for good (pids are reused).
    pub starttime: u64,
}

impl Stat {
    pub fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// `None` when the process does not exist (or this is not Linux).
pub(crate) fn stat(pid: u32) -> Option<Stat> {
    let text = read_capped(Path::new(&format!("/proc/{pid}/stat")), 4096).ok()?;
    parse_stat(&text)
}

/// `pid (comm) S ppid pgrp ...`; `comm` may hold spaces and parentheses,
/// so the fields are counted from its last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    Some(Stat {
        comm,
        state: rest.first()?.chars().next()?,
        pgrp: rest.get(2)?.parse().ok()?,
        // Field 22 of the whole line; `rest` starts at field 3.
        starttime: rest.get(19)?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0000000000000000 100 0 0 10 0\n\
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0\n\
   2: 0500000A:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000 100 0 0 10 0\n\
   3: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 4343 1 0000000000000000 20 4 30 10 -1\n\
   4: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 5151 1 0000000000000000 100 0 0 10 0\n";

    #[test]
    fn proc_net_tables_yield_bound_sockets_with_their_address() {
        let inodes = |port: u16, udp: bool| -> Vec<u64> {
            bound_sockets(TABLE.as_bytes(), udp)
                .into_iter()
                .filter(|s| s.port == port)
                .map(|s| s.inode)
                .collect()
        };
        assert_eq!(inodes(8080, false), vec![4242, 77]);
        assert_eq!(inodes(22, false), vec![99]);
        assert!(inodes(9, false).is_empty());
        assert_eq!(inodes(8080, true), vec![4242, 77, 4343]);
        // Past the first connection only the established hash follows in a
        // kernel's TCP table: a listener printed there is not read.
        assert!(inodes(8081, false).is_empty());
        assert_eq!(inodes(8081, true), vec![5151]);
        let sockets = bound_sockets(TABLE.as_bytes(), false);
        assert_eq!(sockets[0].ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(sockets[2].ip, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)));
    }

    #[test]
    fn only_addresses_that_accept_on_loopback_count() {
        let v6 = |hex: &str| parse_ip(hex).expect("parses");
        assert!(accepts_loopback_v4(v6("0100007F")));
        assert!(accepts_loopback_v4(v6("00000000")));
        assert!(!accepts_loopback_v4(v6("0500000A")));
        assert!(accepts_loopback_v4(v6("00000000000000000000000000000000")));
        assert!(accepts_loopback_v4(v6("0000000000000000FFFF00000100007F")));
        // ::1 is not reached by a connection to 127.0.0.1.
        assert!(!accepts_loopback_v4(v6("00000000000000000000000001000000")));
    }

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let line = "4242 (my (odd) name) T 1 4240 4240 0 -1 4194560 151 0 0 0 0 0 0 0 20 0 1 0 987654 1 2 3";
        let stat = parse_stat(line).expect("parses");
        assert_eq!(stat.comm, "my (odd) name");
        assert_eq!(stat.state, 'T');
        assert_eq!(stat.pgrp, 4240);
        assert_eq!(stat.starttime, 987654);
        assert!(stat_self().starttime > 0);
    }

    fn stat_self() -> Stat {
        super::stat(std::process::id()).expect("this process has a stat")
    }

    #[tokio::test]
    async fn our_own_listener_is_found_and_named() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert!(bind_error(port, Protocol::Tcp).is_some());
        let within = Duration::from_secs(5);
        let owner = owner(port, Protocol::Tcp, within)
            .await
            .expect("this process is found");
        assert_eq!(owner.pid, std::process::id());
        assert_eq!(
            owner.to_string(),
            format!("pid {} ({})", owner.pid, owner.name)
        );
        // This test process leads no group of its own, as a rule; whichever
        // group it is in serves the port, and no other group does.
        let own = stat_self().pgrp;
        assert_eq!(
            served_by_group(port, own, within).await,
            Ok(Serving::ByGroup)
        );
        match served_by_group(port, own + 1, within).await {
            Ok(Serving::Others(holders)) => {
                assert_eq!(
                    holders.iter().map(|h| h.pid).collect::<Vec<_>>(),
                    [owner.pid]
                );
            }
            other => panic!("expected Others, got {other:?}"),
        }
        drop(listener);
        assert!(bind_error(port, Protocol::Tcp).is_none());
        assert_eq!(
            served_by_group(port, own, within).await,
            Ok(Serving::Nobody)
        );
    }
}

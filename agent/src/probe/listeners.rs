//! Sockets already listening when tanzhen starts. The kernel program learns a listener from
//! the CLOSE -> LISTEN transition, which it cannot see for servers started before it; without
//! this, their accepted connections would count under `comm="[unknown]"`.
//!
//! One pass over /proc at attach time: the listening sockets of every network namespace
//! (`/proc/<pid>/net/tcp{,6}` of one process per namespace), then the processes holding them
//! (`/proc/<pid>/fd/*` -> `socket:[inode]`).

use std::{
    collections::{HashMap, HashSet},
    fs,
};

/// A process listening on a TCP port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listening {
    pub port: u16,
    pub tgid: u32,
    pub comm: String,
}

/// Listening sockets of a `/proc/<pid>/net/tcp` or `tcp6` text: socket inode -> local port.
#[must_use]
pub fn parse_proc_net_tcp(text: &str) -> HashMap<u64, u16> {
    const TCP_LISTEN_HEX: &str = "0A";
    let mut out = HashMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
        let (Some(local), Some(st), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
            continue;
        };
        if *st != TCP_LISTEN_HEX {
            continue;
        }
        let port = local
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
        if let (Some(port), Ok(inode)) = (port, inode.parse::<u64>())
            && inode != 0
        {
            out.insert(inode, port);
        }
    }
    out
}

/// The socket inode of an fd link target such as `socket:[12345]`.
#[must_use]
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn pids() -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Every process listening on a TCP port right now, across network namespaces. Processes
/// that vanish during the scan are skipped.
#[must_use]
pub fn scan() -> Vec<Listening> {
    let pids = pids();
    // inode -> port, from one process per network namespace.
    let mut sockets: HashMap<u64, u16> = HashMap::new();
    let mut seen_ns = HashSet::new();
    for &pid in &pids {
        let Ok(ns) = fs::read_link(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if !seen_ns.insert(ns) {
            continue;
        }
        for file in ["tcp", "tcp6"] {
            if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{file}")) {
                sockets.extend(parse_proc_net_tcp(&text));
            }
        }
    }
    let mut out = Vec::new();
    if sockets.is_empty() {
        return out;
    }
    for &pid in &pids {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let mut comm = None;
        for fd in fds.flatten() {
            let Some(port) = fs::read_link(fd.path())
                .ok()
                .and_then(|l| socket_inode(l.to_str()?))
                .and_then(|i| sockets.get(&i).copied())
            else {
                continue;
            };
            let comm = comm.get_or_insert_with(|| {
                fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|c| c.trim_end().to_owned())
                    .unwrap_or_default()
            });
            out.push(Listening {
                port,
                tgid: pid,
                comm: comm.clone(),
            });
        }
    }
    out.sort_by_key(|l| (l.port, l.tgid));
    out.dedup_by_key(|l| l.port);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listening_sockets_only() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1677 1 0000000038f1b136 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 1700 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:2537 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 100 0 0 10 0
   3: garbage";
        let m = parse_proc_net_tcp(text);
        assert_eq!(m.len(), 1, "{m:?}");
        assert_eq!(m[&1677], 2024);
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0";
        assert_eq!(parse_proc_net_tcp(v6)[&99], 22);
    }

    #[test]
    fn socket_links() {
        assert_eq!(socket_inode("socket:[12345]"), Some(12345));
        assert_eq!(socket_inode("pipe:[12345]"), None);
        assert_eq!(socket_inode("socket:[x]"), None);
    }

    #[test]
    fn scan_finds_our_own_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let found = scan();
        let me = found
            .iter()
            .find(|x| x.port == port)
            .expect("our listener is found");
        assert_eq!(me.tgid, std::process::id());
    }
}

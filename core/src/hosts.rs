//! `dispatched.allowed_hosts`: which hosts step requests may reach.
//!
//! A comma-separated list of host names (`api.example.com`, `*.example.com`), IP addresses
//! and CIDR ranges. Empty means any host, except link-local and cloud metadata addresses
//! (169.254.0.0/16, fe80::/10, fd00:ec2::254), which are refused unless an entry names them
//! explicitly. Names are checked before connecting and every resolved address after, so a
//! DNS answer cannot lead a request to a refused address.

use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Name(String),
    /// `*.example.com` stored as `.example.com`
    Suffix(String),
    Net(IpAddr, u8),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostRules {
    entries: Vec<Entry>,
}

fn prefix_len(ip: &IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn in_net(ip: &IpAddr, net: &IpAddr, bits: u8) -> bool {
    // the width is the address family's, never guessed from the values: an IPv6 range whose
    // address happens to fit in 32 bits (::ffff:ffff/16) is still 128 bits wide
    let (ip, net, width) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(*a) as u128, u32::from(*b) as u128, 32u32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(*a), u128::from(*b), 128u32),
        (IpAddr::V6(a), IpAddr::V4(_)) => match a.to_ipv4_mapped() {
            Some(v4) => return in_net(&IpAddr::V4(v4), net, bits),
            None => return false,
        },
        _ => return false,
    };
    if bits as u32 > width {
        return false;
    }
    if bits == 0 {
        return true;
    }
    let shift = width - bits as u32;
    (ip >> shift) == (net >> shift)
}

/// Addresses refused unless listed explicitly.
pub fn is_metadata_or_link_local(ip: &IpAddr) -> bool {
    let v4 = |ip: &IpAddr| in_net(ip, &IpAddr::from([169, 254, 0, 0]), 16);
    match ip {
        IpAddr::V4(_) => v4(ip),
        IpAddr::V6(a) => {
            if let Some(m) = a.to_ipv4_mapped() {
                return v4(&IpAddr::V4(m));
            }
            let seg0 = a.segments()[0];
            (seg0 & 0xffc0) == 0xfe80
                || *a == "fd00:ec2::254".parse::<std::net::Ipv6Addr>().unwrap_or(*a)
        }
    }
}

impl HostRules {
    pub fn parse(list: &str) -> Result<HostRules, String> {
        let mut entries = Vec::new();
        for raw in list.split(',') {
            let item = raw.trim().to_ascii_lowercase();
            if item.is_empty() {
                continue;
            }
            if let Some((addr, bits)) = item.split_once('/') {
                let ip: IpAddr = addr
                    .parse()
                    .map_err(|_| format!("\"{item}\" is not a CIDR range"))?;
                let bits: u8 = bits
                    .parse()
                    .ok()
                    .filter(|b| *b <= prefix_len(&ip))
                    .ok_or_else(|| format!("\"{item}\" has a bad prefix length"))?;
                entries.push(Entry::Net(ip, bits));
            } else if let Ok(ip) = item.trim_matches(['[', ']']).parse::<IpAddr>() {
                entries.push(Entry::Net(ip, prefix_len(&ip)));
            } else if let Some(suffix) = item.strip_prefix("*.") {
                check_hostname(suffix).map_err(|e| format!("\"{item}\": {e}"))?;
                entries.push(Entry::Suffix(format!(".{suffix}")));
            } else {
                check_hostname(&item).map_err(|e| format!("\"{item}\": {e}"))?;
                entries.push(Entry::Name(item));
            }
        }
        Ok(HostRules { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn name_listed(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.entries.iter().any(|e| match e {
            Entry::Name(n) => *n == host,
            Entry::Suffix(s) => host.ends_with(s.as_str()) && host.len() > s.len(),
            Entry::Net(..) => false,
        })
    }

    fn ip_listed(&self, ip: &IpAddr) -> bool {
        self.entries.iter().any(|e| match e {
            Entry::Net(net, bits) => in_net(ip, net, *bits),
            _ => false,
        })
    }

    /// Before connecting: may a request go to this host (as written in the URL)?
    pub fn check_host(&self, host: &str) -> Result<(), String> {
        let bare = host.trim_matches(['[', ']']);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return self.check_addr(host, &ip);
        }
        if self.entries.is_empty() || self.name_listed(bare) {
            Ok(())
        } else {
            Err(format!(
                "host \"{bare}\" is not in dispatched.allowed_hosts"
            ))
        }
    }

    /// After resolving: may a request to `host` connect to `ip`?
    pub fn check_addr(&self, host: &str, ip: &IpAddr) -> Result<(), String> {
        let bare = host.trim_matches(['[', ']']);
        if is_metadata_or_link_local(ip) {
            let exact = self
                .entries
                .iter()
                .any(|e| matches!(e, Entry::Name(n) if n.eq_ignore_ascii_case(bare)));
            return if self.ip_listed(ip) || exact {
                Ok(())
            } else {
                Err(format!(
                    "host \"{bare}\" resolves to {ip}, a link-local or cloud metadata address; list it in dispatched.allowed_hosts to allow it"
                ))
            };
        }
        if self.entries.is_empty() || self.name_listed(bare) || self.ip_listed(ip) {
            Ok(())
        } else {
            Err(format!(
                "host \"{bare}\" ({ip}) is not in dispatched.allowed_hosts"
            ))
        }
    }
}

fn check_hostname(h: &str) -> Result<(), String> {
    if h.is_empty() || h.len() > 253 {
        return Err("not a host name".into());
    }
    if h.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }) {
        Ok(())
    } else {
        Err("not a host name".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn empty_allows_all_but_metadata() {
        let r = HostRules::parse("").unwrap();
        assert!(r.check_host("api.example.com").is_ok());
        assert!(r.check_host("127.0.0.1").is_ok());
        assert!(r.check_addr("localhost", &ip("127.0.0.1")).is_ok());
        let e = r.check_host("169.254.169.254").unwrap_err();
        assert!(e.contains("169.254.169.254"), "{e}");
        assert!(r
            .check_addr("evil.example", &ip("169.254.1.2"))
            .unwrap_err()
            .contains("evil.example"));
        assert!(r.check_host("[fe80::1]").is_err());
        assert!(r.check_host("[fd00:ec2::254]").is_err());
        assert!(r.check_addr("x", &ip("::ffff:169.254.169.254")).is_err());
        assert!(r.check_host("[fd00:ec2::253]").is_ok());
    }

    #[test]
    fn names_wildcards_ips_and_ranges() {
        let r = HostRules::parse("api.example.com, *.internal.test, 10.1.0.0/16, 192.168.1.5, ::1")
            .unwrap();
        assert!(r.check_host("api.example.com").is_ok());
        assert!(r.check_host("API.EXAMPLE.COM").is_ok());
        assert!(r.check_host("a.internal.test").is_ok());
        assert!(r.check_host("internal.test").is_err());
        assert!(r.check_host("10.1.200.3").is_ok());
        assert!(r.check_host("10.2.0.1").is_err());
        assert!(r.check_host("192.168.1.5").is_ok());
        assert!(r.check_host("[::1]").is_ok());
        let e = r.check_host("other.example.com").unwrap_err();
        assert_eq!(
            e,
            "host \"other.example.com\" is not in dispatched.allowed_hosts"
        );
        // a wildcard-allowed name that resolves to a metadata address is still refused
        assert!(r
            .check_addr("evil.internal.test", &ip("169.254.169.254"))
            .is_err());
        // a name listed exactly may point there
        let r = HostRules::parse("metadata.internal").unwrap();
        assert!(r
            .check_addr("metadata.internal", &ip("169.254.169.254"))
            .is_ok());
    }

    #[test]
    fn metadata_allowed_only_when_listed() {
        let r = HostRules::parse("169.254.169.254").unwrap();
        assert!(r.check_host("169.254.169.254").is_ok());
        assert!(r.check_host("169.254.0.1").is_err());
        let r = HostRules::parse("169.254.0.0/16").unwrap();
        assert!(r.check_host("169.254.0.1").is_ok());
    }

    #[test]
    fn ipv6_ranges_are_128_bits_wide_whatever_their_value() {
        // found by reading in_net while writing the hosts fuzz target: the width used to be
        // guessed from the values, so ::1 was outside ::ffff:ffff/16 (it is inside)
        let r = HostRules::parse("::ffff:ffff/16").unwrap();
        assert!(r.check_addr("x", &ip("::1")).is_ok());
        assert!(r.check_addr("x", &ip("1::1")).is_err());
        let r = HostRules::parse("::a00:0/120").unwrap();
        assert!(r.check_addr("x", &ip("::a00:5")).is_ok());
        assert!(r.check_addr("x", &ip("::b00:5")).is_err());
        // and an IPv4 range never matches an IPv6 address that is not IPv4-mapped
        let r = HostRules::parse("0.0.0.0/8").unwrap();
        assert!(r.check_addr("x", &ip("::1")).is_err());
        assert!(r.check_addr("x", &ip("::ffff:0.0.0.1")).is_ok());
    }

    #[test]
    fn bad_lists() {
        assert!(HostRules::parse("10.0.0.0/33")
            .unwrap_err()
            .contains("prefix"));
        assert!(HostRules::parse("bad host")
            .unwrap_err()
            .contains("not a host name"));
        assert!(HostRules::parse("x/8").unwrap_err().contains("CIDR"));
    }
}

/// The parts of an http(s) URL the engine needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlParts {
    pub https: bool,
    /// host[:port] exactly as written
    pub authority: String,
    /// the host without brackets or port
    pub host: String,
    pub port: u16,
}

/// Splits a rendered URL; an error names the problem.
pub fn parse_url(url: &str) -> Result<UrlParts, String> {
    crate::definition::check_url(url)?;
    if url.contains("{{") || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("\"{url}\" is not a valid URL"));
    }
    let (https, rest) = match url.strip_prefix("https://") {
        Some(r) => (true, r),
        None => (false, url.strip_prefix("http://").unwrap_or(url)),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = rest[..end].to_string();
    let (host, port) = if let Some(stripped) = authority.strip_prefix('[') {
        let (h, after) = stripped.split_once(']').unwrap_or((stripped, ""));
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.clone(), None),
        }
    };
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("\"{p}\" is not a valid port"))?,
        None if https => 443,
        None => 80,
    };
    Ok(UrlParts {
        https,
        authority,
        host,
        port,
    })
}

#[cfg(test)]
mod url_tests {
    use super::*;

    #[test]
    fn parts() {
        let p = parse_url("http://127.0.0.1:8080/a?b").unwrap();
        assert_eq!(
            (p.authority.as_str(), p.host.as_str(), p.port, p.https),
            ("127.0.0.1:8080", "127.0.0.1", 8080, false)
        );
        let p = parse_url("https://api.example.com/charge").unwrap();
        assert_eq!((p.authority.as_str(), p.port), ("api.example.com", 443));
        let p = parse_url("http://[::1]:9/x").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("::1", 9));
        assert!(parse_url("http://h/a b").is_err());
        assert!(parse_url("ftp://h/").is_err());
    }
}

//! Allowed hosts and URLs: the first line is a dispatched.allowed_hosts list, the second a
//! URL. HostRules::parse, parse_url, check_host and check_addr never panic, and a URL that
//! parses has a host that check_host can judge.
#![no_main]

use dispatched_core::hosts::{self, HostRules};
use libfuzzer_sys::fuzz_target;
use std::net::IpAddr;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (list, url) = s.split_once('\n').unwrap_or((s, ""));
    let rules = HostRules::parse(list);
    let parsed = hosts::parse_url(url);
    let addrs: [IpAddr; 5] = [
        [127, 0, 0, 1].into(),
        [169, 254, 169, 254].into(),
        [10, 1, 2, 3].into(),
        "fe80::1".parse().unwrap_or(IpAddr::from([0u8; 16])),
        "::ffff:169.254.1.1".parse().unwrap_or(IpAddr::from([0u8; 16])),
    ];
    if let Ok(rules) = rules {
        let _ = rules.check_host(list);
        for a in &addrs {
            let _ = rules.check_addr(url, a);
        }
        if let Ok(p) = &parsed {
            let _ = rules.check_host(&p.host);
            for a in &addrs {
                let r = rules.check_addr(&p.host, a);
                // a metadata address is refused unless the rules name it (or its host) exactly
                if hosts::is_metadata_or_link_local(a) && rules.is_empty() {
                    assert!(r.is_err());
                }
            }
            if let Ok(ip) = p.host.parse::<IpAddr>() {
                let _ = rules.check_addr(&p.host, &ip);
            }
        }
    }
});

//! Fair sharing of a worker's HTTP connections between the services it calls.
//!
//! Every request takes a thread (and a connection) while it is on the wire. A slow service
//! would otherwise hold all of them and stop every other service's steps. So one origin
//! (`host:port`) gets at most `cap` requests on the wire; the rest wait here, in arrival
//! order, and go out as that origin's earlier requests finish. Requests that wait do not
//! take a thread, so the worker goes on claiming and sending other services' steps.

use std::collections::{HashMap, VecDeque};

/// Requests waiting for their origin, by origin.
pub struct Fair<J> {
    cap: usize,
    on_wire: HashMap<String, usize>,
    waiting: HashMap<String, VecDeque<Waiting<J>>>,
    queued: usize,
}

/// A request that waits for its origin, and since when (epoch ms).
pub struct Waiting<J> {
    pub job: J,
    pub since_ms: i64,
}

impl<J> Fair<J> {
    /// `cap`: requests on the wire per origin (at least 1).
    pub fn new(cap: usize) -> Self {
        Fair {
            cap: cap.max(1),
            on_wire: HashMap::new(),
            waiting: HashMap::new(),
            queued: 0,
        }
    }

    pub fn set_cap(&mut self, cap: usize) {
        self.cap = cap.max(1);
    }

    /// A request for `origin`: returned when it may go on the wire now (counted as on the
    /// wire), otherwise kept until [`Fair::done`] releases it.
    pub fn offer(&mut self, origin: &str, job: J, now_ms: i64) -> Option<J> {
        let n = self.on_wire.entry(origin.to_string()).or_insert(0);
        if *n < self.cap {
            *n += 1;
            return Some(job);
        }
        self.waiting
            .entry(origin.to_string())
            .or_default()
            .push_back(Waiting {
                job,
                since_ms: now_ms,
            });
        self.queued += 1;
        None
    }

    /// A request to `origin` came back: the next one waiting for it, if any, goes on the
    /// wire in its place (and is counted so).
    pub fn done(&mut self, origin: &str) -> Option<J> {
        if let Some(q) = self.waiting.get_mut(origin) {
            if let Some(w) = q.pop_front() {
                self.queued -= 1;
                if q.is_empty() {
                    self.waiting.remove(origin);
                }
                return Some(w.job);
            }
        }
        if let Some(n) = self.on_wire.get_mut(origin) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.on_wire.remove(origin);
            }
        }
        None
    }

    /// How many requests wait.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// The requests that have waited since before `before_ms`, each marked as waiting from
    /// `now_ms` on (the caller renews what they hold, e.g. their leases).
    pub fn waited_since(&mut self, before_ms: i64, now_ms: i64) -> Vec<&J> {
        let mut out = Vec::new();
        for q in self.waiting.values_mut() {
            for w in q.iter_mut() {
                if w.since_ms < before_ms {
                    w.since_ms = now_ms;
                    out.push(&w.job);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_origin_gets_at_most_cap_on_the_wire_and_the_rest_follow_in_order() {
        let mut f = Fair::new(2);
        assert_eq!(f.offer("slow:80", 1, 0), Some(1));
        assert_eq!(f.offer("slow:80", 2, 0), Some(2));
        assert_eq!(f.offer("slow:80", 3, 0), None);
        assert_eq!(f.offer("slow:80", 4, 0), None);
        // another origin is not held up
        assert_eq!(f.offer("fast:80", 5, 0), Some(5));
        assert_eq!(f.queued(), 2);
        // as the slow origin's requests come back, its waiting ones go, in order
        assert_eq!(f.done("slow:80"), Some(3));
        assert_eq!(f.done("slow:80"), Some(4));
        assert_eq!(f.queued(), 0);
        assert_eq!(f.done("slow:80"), None);
        assert_eq!(f.done("slow:80"), None);
        // nothing on the wire: the origin starts over with its full share
        assert_eq!(f.offer("slow:80", 6, 0), Some(6));
        assert_eq!(f.offer("slow:80", 7, 0), Some(7));
        assert_eq!(f.done("fast:80"), None);
        assert_eq!(f.offer("fast:80", 8, 0), Some(8));
    }

    #[test]
    fn long_waits_are_reported_once_per_period() {
        let mut f = Fair::new(1);
        assert_eq!(f.offer("a:1", "on wire", 0), Some("on wire"));
        assert_eq!(f.offer("a:1", "early", 100), None);
        assert_eq!(f.offer("a:1", "late", 5_000), None);
        let old: Vec<&str> = f.waited_since(1_000, 6_000).into_iter().copied().collect();
        assert_eq!(old, ["early"]);
        // renewed at 6000: not old again until later
        assert!(f.waited_since(1_000, 7_000).is_empty());
        let old: Vec<&str> = f.waited_since(6_500, 8_000).into_iter().copied().collect();
        assert_eq!(old, ["early", "late"]);
    }

    #[test]
    fn a_cap_of_zero_still_lets_one_through() {
        let mut f = Fair::new(0);
        assert_eq!(f.offer("a:1", 1, 0), Some(1));
        assert_eq!(f.offer("a:1", 2, 0), None);
    }
}

//! The functional core of `dispatched`: plain Rust, no Postgres.
//!
//! * [`definition`]: the workflow definition format, parsed and validated with JSON paths
//! * [`depth`]: how deeply JSON text nests, counted without recursion
//! * [`duration`]: `500ms`, `30s`, `10m`, `2h`, `1d`, `14 days`
//! * [`expr`]: the `{{ ... }}` expression language
//! * [`fair`]: a share of the HTTP connections per service, so a slow one cannot take them all
//! * [`hash`]: invocation ids and cache keys
//! * [`keys`]: idempotency keys, names, run ids
//! * [`rules`]: what an HTTP status means (for steps and for the Layer 1 cache)

pub mod definition;
pub mod depth;
pub mod directives;
pub mod duration;
pub mod engine;
pub mod expr;
pub mod fair;
pub mod hash;
pub mod hosts;
pub mod keys;
pub mod redact;
pub mod rules;

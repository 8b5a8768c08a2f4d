//! Reading jsonb in the worker without serde_json's 128-level limit.
//!
//! The worker loads runs as one jsonb document per run that wraps the stored values a few
//! levels deep (a response body sits at `steps[i].response.body`), so a value that is
//! accepted at 100 levels (or a response body at 127, the most serde_json parses) may be
//! read back deeper than 128. pgrx's `JsonB` then panics and the whole batch of runs with it,
//! again at every claim: one run would hold up every other. [`DeepJsonB`] counts the depth
//! on the text first (no recursion) and parses anything up to [`MAX_READ_DEPTH`] levels.

use dispatched_core::depth;
use pgrx::prelude::*;
use pgrx::{direct_function_call, pg_sys, FromDatum, IntoDatum, JsonB};

/// Far above what gets in (definitions, inputs and signal data are refused past 100
/// levels), far below what the worker's 8 MB stack could not parse.
pub const MAX_READ_DEPTH: usize = 1024;

pub struct DeepJsonB(pub serde_json::Value);

fn parse(text: &str) -> Result<serde_json::Value, String> {
    let d = depth::json_depth(text);
    if d > MAX_READ_DEPTH {
        return Err(format!(
            "a stored jsonb value is nested {d} levels deep (at most {MAX_READ_DEPTH} are read)"
        ));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    de.disable_recursion_limit();
    let v = serde::Deserialize::deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(v)
}

impl FromDatum for DeepJsonB {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<DeepJsonB> {
        if is_null {
            return None;
        }
        let cstr = direct_function_call::<&core::ffi::CStr>(pg_sys::jsonb_out, &[Some(datum)])?;
        let parsed = match cstr.to_str() {
            Ok(text) => parse(text),
            Err(e) => Err(format!("jsonb text is not UTF-8: {e}")),
        };
        pg_sys::pfree(cstr.as_ptr() as *mut core::ffi::c_void);
        match parsed {
            Ok(v) => Some(DeepJsonB(v)),
            Err(e) => error!("dispatched worker: {e}"),
        }
    }
}

impl IntoDatum for DeepJsonB {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        JsonB(self.0).into_datum()
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
    }
}

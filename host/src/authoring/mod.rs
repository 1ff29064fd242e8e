//! Tools for driver authors: `plughost check` (the conformance suite through the real loader) and
//! `plughost new` / `plughost api-source`.

pub mod check;
pub mod scaffold;

//! Leaf helpers that any layer may use; nothing here imports anything else of the host.

pub(crate) mod fmt;
pub(crate) mod fs;
pub(crate) mod netns;
pub(crate) mod time;
pub(crate) mod users;

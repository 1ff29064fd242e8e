//! Everything before a driver's code runs in the host: the trust policy for files, the ELF checks, the
//! loader (digest, pins, sealed copy, probe, layout checks), the sandboxed child, the driver
//! directories, and the load errors.

pub mod drivers;
pub(crate) mod elf;
pub mod error;
pub mod loader;
pub mod sandbox;
pub(crate) mod trust;

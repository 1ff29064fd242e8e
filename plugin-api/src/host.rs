//! Host side: opening driver libraries and constructing drivers. Enabled by the `host` feature; driver
//! authors do not need it.
//!
//! This module is the only place that touches abi_stable's loader, so that the host crate never names an
//! abi_stable type.

use std::path::Path;

use abi_stable::library::{lib_header_from_path, LibraryError, RootModuleError};
use abi_stable::std_types::{RStr, Tuple2};

use crate::compute::ComputeClient;
use crate::volume::VolumeClient;
use crate::{DriverError, DriverKind, DriverModuleRef, OptionSpec, Options};

/// Why a library could not be opened as a driver. Messages are lowercase, one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// The dynamic loader refused the file.
    Dlopen(String),
    /// The library has no plughost root module: it is some other shared library.
    NotADriver,
    /// Built with an abi_stable whose ABI differs from the host's.
    AbiStable {
        /// What the library's header says, in a few words.
        found: String,
    },
    /// Built against a plugin-api version this host cannot load.
    ApiVersion {
        /// The host's plugin-api version.
        host: String,
        /// The library's plugin-api version.
        library: String,
    },
    /// The types in the library differ from the host's.
    Layout {
        /// The first few `Error:` / `Expected:` / `Found:` lines.
        summary: Vec<String>,
        /// abi_stable's full report, for the debug log.
        full: String,
    },
    /// The root module's constructor failed or panicked.
    ModuleInit(String),
    /// Anything else abi_stable reported.
    Other(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Dlopen(e) => write!(f, "dynamic loader failed: {e}"),
            OpenError::NotADriver => f.write_str("not a plughost driver (no plughost root module)"),
            OpenError::AbiStable { found } => {
                write!(f, "built with an incompatible abi_stable ({found})")
            }
            OpenError::ApiVersion { host, library } => {
                write!(f, "incompatible plugin-api version: host has {host}, library was built against {library}")
            }
            OpenError::Layout { .. } => {
                f.write_str("layout mismatch: the driver was built against a different plugin-api interface")
            }
            OpenError::ModuleInit(e) => write!(f, "root module failed to initialise: {e}"),
            OpenError::Other(e) => f.write_str(e),
        }
    }
}

/// Keeps the first few lines of a layout report that say what differs.
fn summarize_layout(full: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = full.lines().map(str::trim).peekable();
    while let Some(line) = lines.next() {
        let interesting = ["Error:", "Expected:", "Found:"].iter().any(|p| line.starts_with(p));
        if !interesting {
            continue;
        }
        // abi_stable sometimes puts the value on the next line.
        let mut text = line.to_owned();
        if line.ends_with(':') {
            if let Some(next) = lines.peek() {
                text = format!("{line} {next}");
                lines.next();
            }
        }
        let text: String = text.chars().filter(|c| !c.is_control()).take(160).collect();
        if !out.contains(&text) {
            out.push(text);
        }
        if out.len() >= 3 {
            break;
        }
    }
    out
}

fn classify(err: LibraryError) -> OpenError {
    match err {
        LibraryError::OpenError { err, .. } => {
            OpenError::Dlopen(err.to_string().chars().filter(|c| !c.is_control()).collect())
        }
        LibraryError::GetSymbolError { .. } => OpenError::NotADriver,
        LibraryError::InvalidAbiHeader(h) => OpenError::AbiStable {
            found: if h.magic_string == abi_stable::library::AbiHeader::VALUE.magic_string {
                format!("library abi {}.{}", h.abi_major, h.abi_minor)
            } else {
                "unrecognised abi header".to_owned()
            },
        },
        LibraryError::InvalidCAbi { .. } => OpenError::AbiStable { found: "C ABI test failed".to_owned() },
        LibraryError::IncompatibleVersionNumber { expected_version, actual_version, .. } => {
            OpenError::ApiVersion { host: expected_version.to_string(), library: actual_version.to_string() }
        }
        LibraryError::ParseVersionError(e) => {
            OpenError::ApiVersion { host: crate::API_VERSION.to_owned(), library: format!("unparseable ({e})") }
        }
        LibraryError::AbiInstability(e) => {
            let full = e.to_string();
            OpenError::Layout { summary: summarize_layout(&full), full }
        }
        LibraryError::RootModule { err, .. } => OpenError::ModuleInit(match err {
            RootModuleError::Unwound => "it panicked".to_owned(),
            other => other.to_string().replace('\n', " "),
        }),
        LibraryError::Many(errs) => match errs.into_iter().next() {
            Some(e) => classify(e),
            None => OpenError::Other("unknown loader error".to_owned()),
        },
    }
}

/// An opened, verified driver library. Opening runs no driver code; libraries are never unloaded.
#[derive(Clone, Copy)]
pub struct DriverLibrary {
    module: DriverModuleRef,
}

impl std::fmt::Debug for DriverLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverLibrary").field("name", &self.name()).field("kind", &self.kind()).finish()
    }
}

/// Opens `path` (which should be a private copy: the dynamic loader caches by path), checks the
/// abi_stable header, the plugin-api version and the layout of every type in the interface.
pub fn open(path: &Path) -> Result<DriverLibrary, OpenError> {
    let header = lib_header_from_path(path).map_err(classify)?;
    let module = header.init_root_module::<DriverModuleRef>().map_err(classify)?;
    Ok(DriverLibrary { module })
}

impl DriverLibrary {
    /// The driver's name.
    pub fn name(&self) -> &'static str {
        self.module.name().as_str()
    }
    /// The driver's kind.
    pub fn kind(&self) -> DriverKind {
        self.module.kind()
    }
    /// The driver's version.
    pub fn version(&self) -> &'static str {
        self.module.version().as_str()
    }
    /// The plugin-api version the driver was built against.
    pub fn api_version(&self) -> &'static str {
        self.module.api_version().as_str()
    }
    /// One-line summary.
    pub fn summary(&self) -> &'static str {
        self.module.summary().as_str()
    }
    /// The option schema.
    pub fn options(&self) -> &'static [OptionSpec] {
        self.module.options().as_slice()
    }
    /// Whether the library was built with `panic = "unwind"`.
    pub fn panic_unwind(&self) -> bool {
        self.module.panic_unwind()
    }

    /// Constructs the volume driver. Errors and panics in the constructor come back as `Err`.
    pub fn new_volume(&self, options: &Options) -> Result<VolumeClient, DriverError> {
        let ctor = self.module.new_volume().ok_or_else(|| {
            DriverError::unsupported(format!(
                "driver {:?} is a {} driver, not a volume driver",
                self.name(),
                self.kind()
            ))
        })?;
        let pairs: Vec<Tuple2<RStr<'_>, RStr<'_>>> =
            options.pairs().iter().map(|(k, v)| Tuple2(RStr::from(k.as_str()), RStr::from(v.as_str()))).collect();
        ctor(pairs.as_slice().into()).into_result().map(VolumeClient::new)
    }

    /// Constructs the compute driver. Errors and panics in the constructor come back as `Err`.
    pub fn new_compute(&self, options: &Options) -> Result<ComputeClient, DriverError> {
        let ctor = self.module.new_compute().ok_or_else(|| {
            DriverError::unsupported(format!(
                "driver {:?} is a {} driver, not a compute driver",
                self.name(),
                self.kind()
            ))
        })?;
        let pairs: Vec<Tuple2<RStr<'_>, RStr<'_>>> =
            options.pairs().iter().map(|(k, v)| Tuple2(RStr::from(k.as_str()), RStr::from(v.as_str()))).collect();
        ctor(pairs.as_slice().into()).into_result().map(ComputeClient::new)
    }
}

//! Host side: opening driver libraries and constructing drivers. Enabled by the `host` feature; driver
//! authors do not need it.
//!
//! This module is the only place that touches abi_stable's loader and layout checker, so that the host
//! crate never names an abi_stable type, and the only place that opens a library: [`open`] runs the
//! dynamic loader once (`RTLD_NOW`, so that unresolved symbols fail here and not at a first call), then
//! checks the abi_stable header, the plugin API version, the layout of the root module and the layout of
//! the kind's interface.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use abi_stable::abi_stability::abi_checking::{check_layout_compatibility, AbiInstability, AbiInstabilityErrors};
use abi_stable::library::{AbiHeader, AbiHeaderRef, LibHeader, LibraryError, RootModuleError};
use abi_stable::std_types::{RStr, Tuple2};
use abi_stable::type_layout::TypeLayout;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::interface::RawDriver;
pub use crate::options::prepare as prepare_options;
pub use crate::options::{normalize_value, validate, OptionError};
use crate::{DriverError, DriverKind, DriverModuleRef, OptionSpec, Options};

/// The name of the symbol every driver library exports (abi_stable's root-module loader), for hosts
/// that look for it in a file before loading anything.
pub const ROOT_SYMBOL: &str = crate::module::__private::ROOT_SYMBOL;

/// One driver kind as the host sees it: generated for each kind from its interface definition.
pub trait Interface: Send + Sync + Sized + 'static {
    /// The kind.
    const KIND: DriverKind;
    /// Every method's name, indexed by [`method_index`](Self::method_index) (lifecycle first).
    const METHODS: &'static [&'static str];
    /// The author trait as an object (`dyn VolumeDriver`): what services call.
    type Object: ?Sized + Send + Sync + 'static;
    /// A driver loaded in this process (`VolumeClient`): an [`Object`](Self::Object) that callers can
    /// also hold by its concrete type, so that calls through it need no dynamic dispatch.
    type Client: Send + Sync + 'static;
    /// A method, for call statistics.
    type Method: Copy + Send + Sync + std::fmt::Debug + 'static;
    /// One call with owned arguments (what crosses a process boundary).
    type Call: Serialize + DeserializeOwned + Send + std::fmt::Debug + 'static;
    /// Its answer.
    type Reply: Serialize + DeserializeOwned + Send + std::fmt::Debug + 'static;

    #[doc(hidden)]
    fn from_raw(raw: RawDriver, checked: &'static TypeLayout) -> Result<Constructed<Self>, String>;
    /// The client as the author trait object.
    fn as_object(client: &Self::Client) -> &Self::Object;
    /// See the author trait's `init`.
    fn init(object: &Self::Object) -> Result<(), DriverError>;
    /// See the author trait's `cleanup`.
    fn cleanup(object: &Self::Object) -> Result<(), DriverError>;
    /// See the author trait's `health`.
    fn health(object: &Self::Object) -> Result<(), DriverError>;
    /// Which method a call is.
    fn method(call: &Self::Call) -> Self::Method;
    /// Its index in [`METHODS`](Self::METHODS).
    fn method_index(method: Self::Method) -> usize;
    /// Runs a call on a driver.
    fn invoke(object: &Self::Object, call: Self::Call) -> Self::Reply;
    /// A driver served elsewhere, reached through `transport`.
    fn remote(transport: Box<dyn Transport<Self>>) -> Box<Self::Object>;
}

/// A constructed driver, and the extensions it provides.
pub struct Constructed<I: Interface> {
    /// The driver.
    pub driver: I::Client,
    /// The ids of the extensions it provides (methods added by later minor versions of the API).
    pub extensions: Vec<&'static str>,
}

impl<I: Interface> std::fmt::Debug for Constructed<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constructed").field("kind", &I::KIND).field("extensions", &self.extensions).finish()
    }
}

/// Carries calls of one kind to a driver served elsewhere (another process) and brings the answers back.
pub trait Transport<I: Interface>: Send + Sync {
    /// Sends one call and waits for its answer. A failure of the transport itself is an `Err`.
    fn call(&self, call: I::Call) -> Result<I::Reply, DriverError>;
}

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
    /// Built against a plugin API version this host cannot load.
    ApiVersion {
        /// The host's plugin API version.
        host: String,
        /// The library's plugin API version.
        library: String,
    },
    /// The types in the library differ from the host's.
    Layout {
        /// Where and how, in one line: the differing type and field, innermost first.
        summary: String,
        /// abi_stable's own `Error:` / `Expected:` / `Found:` lines (at most three).
        details: Vec<String>,
        /// abi_stable's full report, for the debug log.
        full: String,
    },
    /// A driver of a kind this host does not know.
    UnknownKind(String),
    /// The root module's constructor failed or panicked.
    ModuleInit(String),
    /// Anything else abi_stable reported.
    Other(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Dlopen(e) => write!(f, "dynamic loader refused it: {e}"),
            OpenError::NotADriver => f.write_str("not a plughost driver (no plughost root module)"),
            OpenError::AbiStable { found } => {
                write!(f, "built with an incompatible abi_stable ({found})")
            }
            OpenError::ApiVersion { host, library } => {
                write!(f, "incompatible plugin-api version: host has {host}, library was built against {library}")
            }
            OpenError::Layout { summary, .. } => write!(f, "layout mismatch: {summary}"),
            OpenError::UnknownKind(k) => {
                write!(f, "driver of an unknown kind ({k}); built against a newer plugin-api?")
            }
            OpenError::ModuleInit(e) => write!(f, "root module failed to initialise: {e}"),
            OpenError::Other(e) => f.write_str(e),
        }
    }
}

fn one_line(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect::<String>().trim().to_owned()
}

/// The type and field where two layouts differ, innermost first, and how, in one line:
/// `parameter new_size of method extend (in VolumeDriverFfi_TO): expected u64, found u32`.
fn summarize(errors: &AbiInstabilityErrors) -> String {
    use abi_stable::type_layout::TLFieldOrFunction;
    // abi_stable reports the chain down to the difference; the deepest error that says something is it.
    let Some(first) = errors.errors.iter().filter(|e| !e.errs.is_empty()).max_by_key(|e| e.stack_trace.len()) else {
        return "the interface types differ".to_owned();
    };
    let trace: Vec<&TLFieldOrFunction> = first.stack_trace.iter().map(|ef| &ef.expected).collect();
    let mut path = Vec::new();
    for (i, step) in trace.iter().enumerate().rev() {
        match step {
            TLFieldOrFunction::Function(f) => {
                let last = path.last().map(String::as_str);
                if last != Some(&*format!("method {}", f.name)) {
                    path.push(format!("method {}", f.name));
                }
            }
            TLFieldOrFunction::Field(field) => {
                let name = field.name();
                // sabi_trait's own plumbing says nothing to a driver author.
                if matches!(name, "obj" | "vtable" | "0" | "ptr") {
                    continue;
                }
                let param = name.strip_prefix("param_").and_then(|n| n.parse::<usize>().ok());
                match (param, i.checked_sub(1).map(|j| trace[j])) {
                    (Some(n), Some(TLFieldOrFunction::Function(f))) => {
                        // The layout numbers parameters from `self` (param_0) and keeps no names.
                        let pname =
                            n.checked_sub(1).and_then(|i| crate::module::param_names(f.name.as_str())?.get(i).copied());
                        path.push(format!("parameter {}", pname.unwrap_or(name)));
                    }
                    _ if name == "__returns" => path.push("return value".to_owned()),
                    // A vtable field is named after its method, which the next step names.
                    _ if matches!(trace.get(i + 1), Some(TLFieldOrFunction::Function(f)) if f.name.as_str() == name) => {
                    }
                    _ => path.push(format!("field {name}")),
                }
            }
        }
    }
    path.truncate(4);
    let what = first.errs.first().map(|e| match e {
        AbiInstability::MismatchedPrimitive(v) => format!("expected {:?}, found {:?}", v.expected, v.found),
        AbiInstability::Name(v) => format!("expected {}, found {}", v.expected, v.found),
        AbiInstability::FieldCountMismatch(v) => {
            format!("expected {} fields or methods, found {}", v.expected, v.found)
        }
        AbiInstability::UnexpectedField(v) => format!("expected field {}, found {}", v.expected.name(), v.found.name()),
        AbiInstability::Size(v) => format!("expected size {}, found {}", v.expected, v.found),
        AbiInstability::Package(v) => format!("expected package {}, found {}", v.expected, v.found),
        AbiInstability::PackageVersion(v) => format!("expected version {}, found {}", v.expected, v.found),
        other => one_line(&format!("{other:?}")).chars().take(120).collect(),
    });
    let what = what.unwrap_or_else(|| "they differ".to_owned());
    let interface = errors.interface.full_type().to_string().replace("<'lt>", "");
    if path.is_empty() {
        format!("{interface}: {what}")
    } else {
        format!("{} (in {interface}): {what}", path.join(" of "))
    }
}

/// Keeps the first few lines of abi_stable's report that say what differs.
fn summarize_report(full: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = full.lines().map(str::trim).peekable();
    while let Some(line) = lines.next() {
        if !["Error:", "Expected:", "Found:"].iter().any(|p| line.starts_with(p)) {
            continue;
        }
        // abi_stable sometimes puts the value on the next line.
        let mut text = line.to_owned();
        if line.ends_with(':') {
            if let Some(next) = lines.next() {
                text = format!("{line} {next}");
            }
        }
        let text: String = one_line(&text).chars().take(160).collect();
        if !out.contains(&text) {
            out.push(text);
        }
        if out.len() >= 3 {
            break;
        }
    }
    out
}

/// Checks that a layout a library reports is compatible with the host's. Errors are one line.
pub(crate) fn check_layout(expected: &'static TypeLayout, found: &'static TypeLayout) -> Result<(), String> {
    check_layout_compatibility(expected, found).map_err(|e| summarize(&e))
}

fn classify(err: LibraryError) -> OpenError {
    match err {
        LibraryError::OpenError { err, .. } => OpenError::Dlopen(one_line(&err.to_string())),
        LibraryError::GetSymbolError { .. } => OpenError::NotADriver,
        LibraryError::InvalidAbiHeader(h) => OpenError::AbiStable {
            found: if h.magic_string == AbiHeader::VALUE.magic_string {
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
            let summary = match e.downcast::<AbiInstabilityErrors>() {
                Ok(errors) => summarize(&errors),
                Err(_) => "the interface types differ".to_owned(),
            };
            OpenError::Layout { summary, details: summarize_report(&full), full }
        }
        LibraryError::RootModule { err, .. } => OpenError::ModuleInit(match err {
            RootModuleError::Unwound => "it panicked".to_owned(),
            other => one_line(&other.to_string()),
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

fn dlerror() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string valid until the next dl* call on this
    // thread; it is copied at once.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        return "unknown error".to_owned();
    }
    // SAFETY: non-null, NUL-terminated (see above).
    one_line(&unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy())
}

/// Opens `path` with the dynamic loader (`RTLD_NOW | RTLD_LOCAL`; it runs the library's ELF
/// initializers, as any load does), then checks the abi_stable header, the plugin API version, the
/// layout of the root module and of the kind's interface. The caller must have checked the file first:
/// this is where foreign code starts running. The library is never unloaded.
///
/// `path` should be a path no one else can replace (a private copy, `/proc/self/fd/N` of a sealed
/// memfd): the dynamic loader caches by path and name.
pub fn open(path: &Path) -> Result<DriverLibrary, OpenError> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| OpenError::Dlopen("path contains NUL".into()))?;
    // SAFETY: `c` is a valid NUL-terminated path. Loading runs the library's initializers: the caller
    // has checked the file as far as it can without running it (see the loader).
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        let text = dlerror();
        let prefix = format!("{}: ", path.display());
        return Err(OpenError::Dlopen(text.split(&prefix).last().unwrap_or(&text).to_owned()));
    }
    let symbol = CString::new(ROOT_SYMBOL).expect("the root symbol name has no NUL");
    // SAFETY: `handle` is a live handle (never closed); `symbol` is NUL-terminated.
    let address = unsafe { libc::dlsym(handle, symbol.as_ptr()) };
    if address.is_null() {
        return Err(OpenError::NotADriver);
    }
    // SAFETY: the exported root symbol of an abi_stable library is a `LibHeader` static whose first field
    // is an `AbiHeader`; `AbiHeaderRef` is a transparent reference to it, and this is how abi_stable reads
    // it (`abi_header_from_raw_library`). `upgrade` checks the header before anything else is read.
    let header: AbiHeaderRef = unsafe { std::mem::transmute::<*mut libc::c_void, AbiHeaderRef>(address) };
    let header: &'static LibHeader = header.upgrade().map_err(classify)?;
    let module = header.init_root_module::<DriverModuleRef>().map_err(classify)?;
    let library = DriverLibrary { module };
    let kind = module.kind();
    let expected = kind.layout().ok_or_else(|| OpenError::UnknownKind(format!("kind number {}", kind.number())))?;
    if let Err(e) = check_layout_compatibility(expected, module.interface()) {
        let full = e.to_string();
        return Err(OpenError::Layout { summary: summarize(&e), details: summarize_report(&full), full });
    }
    Ok(library)
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
    /// The plugin API version the driver was built against.
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

    /// Constructs the driver as kind `I` (which the caller has checked is the library's kind). Errors
    /// and panics in the constructor come back as `Err`, as does an extension with a mismatched layout.
    pub fn construct<I: Interface>(&self, options: &Options) -> Result<Constructed<I>, ConstructError> {
        if self.kind() != I::KIND {
            return Err(ConstructError::WrongKind { found: self.kind(), expected: I::KIND });
        }
        let pairs: Vec<Tuple2<RStr<'_>, RStr<'_>>> =
            options.pairs().iter().map(|(k, v)| Tuple2(RStr::from(k.as_str()), RStr::from(v.as_str()))).collect();
        let raw = (self.module.new())(pairs.as_slice().into()).into_result().map_err(ConstructError::Driver)?;
        I::from_raw(raw, self.module.interface()).map_err(ConstructError::Layout)
    }
}

/// Why [`DriverLibrary::construct`] failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConstructError {
    /// The library holds a driver of another kind.
    WrongKind {
        /// The library's kind.
        found: DriverKind,
        /// The kind asked for.
        expected: DriverKind,
    },
    /// The constructor returned an error (or panicked: kind `panicked`).
    Driver(DriverError),
    /// The constructed driver's objects do not have the layouts the host expects.
    Layout(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(deprecated)] // the 1.x API stays until 2.0
    fn kinds_and_their_layouts_are_registered_once() {
        let kinds: Vec<DriverKind> = DriverKind::all().collect();
        assert!(kinds.contains(&DriverKind::VOLUME) && kinds.contains(&DriverKind::COMPUTE));
        for (i, k) in kinds.iter().copied().enumerate() {
            assert!(!kinds[..i].contains(&k), "kind {k} registered twice");
            assert_eq!(DriverKind::from_name(k.as_str()), Some(k));
            assert!(k.layout().is_some());
        }
        assert_eq!(crate::VolumeInterface::KIND, DriverKind::VOLUME);
        assert_eq!(crate::ComputeInterface::KIND, DriverKind::COMPUTE);
    }

    #[test]
    fn a_mismatched_layout_is_summarized_in_one_line_naming_the_types() {
        let e = check_layout(crate::volume::__kind::LAYOUT, crate::compute::__kind::LAYOUT).unwrap_err();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("VolumeDriverFfi"), "{e}");
    }
}

//! What every driver kind shares, written once: the objects that cross the library boundary, the
//! conversions between an author's std types and their stable-ABI mirrors, and `driver_interface!`,
//! which generates a kind's author trait, stable-ABI traits, plugin-side adapter, host-side client and
//! (feature `host`) its typed calls from one list of methods.
//!
//! # Evolution rules (read before changing any interface)
//! These are the rules that keep the compatibility promise in the crate documentation.
//! - Within a major version the **frozen** parts never change: [`DriverModule`](crate::DriverModule)'s
//!   fields, every `*Ffi` trait generated from a kind's `methods` list, and every type they mention
//!   (`FfiVolume`, `DriverError`, `OptionSpec`, ...). abi_stable checks their layouts when a library is
//!   loaded, and it refuses a library whose prefix types have *fewer* fields than the host's, so appending
//!   a field or a method there would make every newer host refuse every older driver.
//! - A minor version adds methods as an **extension**: a new entry in the kind's `extensions` list, with
//!   its own id, its own stable-ABI trait and a default body on the author trait (usually
//!   `unsupported`). A host asks each driver for the extensions it knows (`DriverBase::extension`) and
//!   checks the layout of each one it gets; a driver built against an older minor has none, and the host
//!   answers with the default body; an older host never asks for a newer extension.
//! - An extension, once released, is frozen like the rest. Changing it means a new id.
//! - A new driver kind is a new [`DriverKind`](crate::DriverKind) value and a new interface file; older
//!   hosts refuse drivers of a kind they do not know.
//! - Anything else (changing, removing or reordering anything frozen) is a breaking change and needs a
//!   new major version.

use abi_stable::pointer_trait::TransmuteElement;
use abi_stable::std_types::{RArc, RBox, RResult, RSlice, RStr, RString, RVec, Tuple2};
use abi_stable::type_layout::TypeLayout;
use abi_stable::StableAbi;

use crate::DriverError;

/// A value crossing the boundary with its type erased and its layout attached, so that the receiver
/// can check the layout before using it (constructed drivers, extensions).
#[doc(hidden)]
#[repr(C)]
#[derive(StableAbi)]
pub struct RawObject {
    layout: &'static TypeLayout,
    value: RBox<()>,
}

impl RawObject {
    /// Erases `value`.
    pub fn new<T: StableAbi>(value: T) -> RawObject {
        // SAFETY: this changes only the static type of the box's pointee. The box's own vtable still
        // destroys a `T`, so dropping the erased box is correct; `into_typed` restores the type only
        // after its caller has checked `layout`.
        let value = unsafe { RBox::new(value).transmute_element::<()>() };
        RawObject { layout: T::LAYOUT, value }
    }

    /// The layout of the erased value, as the library that made it sees it.
    pub fn layout(&self) -> &'static TypeLayout {
        self.layout
    }

    /// Restores the value.
    ///
    /// # Safety
    /// `T`'s layout must be compatible with [`layout`](Self::layout) (the same type, or checked with
    /// abi_stable's layout checker).
    pub unsafe fn into_typed<T: StableAbi>(self) -> T {
        // SAFETY: the caller guarantees the erased value is a `T`.
        RBox::into_inner(unsafe { self.value.transmute_element::<T>() })
    }
}

#[allow(non_local_definitions, missing_docs, clippy::undocumented_unsafe_blocks)]
pub(crate) mod ffi {
    use super::*;

    /// What every driver has whatever its kind: its lifecycle. Frozen.
    #[abi_stable::sabi_trait]
    pub trait DriverBaseFfi: Send + Sync {
        fn init(&self) -> RResult<(), DriverError>;
        fn cleanup(&self) -> RResult<(), DriverError>;
        fn health(&self) -> RResult<(), DriverError>;
    }
}

/// The stable-ABI lifecycle object of a constructed driver.
#[doc(hidden)]
pub type DriverBaseBox = ffi::DriverBaseFfi_TO<'static, RArc<()>>;

/// What a driver constructor returns: the lifecycle object, the kind's object, and the driver's
/// extensions by id, all sharing the one driver value. Frozen; the list of extensions is where later
/// minor versions add.
#[doc(hidden)]
#[repr(C)]
#[derive(StableAbi)]
pub struct RawDriver {
    pub(crate) base: DriverBaseBox,
    pub(crate) object: RawObject,
    pub(crate) extensions: RVec<Tuple2<RStr<'static>, RawObject>>,
}

// ---------------------------------------------------------------------------------------------------
// Conversions between an author's std types and their stable-ABI mirrors. Implemented for the argument
// and return types the interfaces use; `driver_interface!` calls them, nobody else does.

/// An argument as the host passes it: std type → stable-ABI type.
#[doc(hidden)]
pub trait ToFfi {
    type Ffi;
    fn to_ffi(self) -> Self::Ffi;
}

/// An argument as the plugin receives it: stable-ABI type → something it can lend the author.
#[doc(hidden)]
pub trait FromFfi {
    type Held;
    fn hold(self) -> Self::Held;
}

/// Lends a held or owned argument as the author trait takes it (`String` → `&str`).
#[doc(hidden)]
pub trait Lend<'b> {
    type Out;
    fn lend(&'b self) -> Self::Out;
}

/// A borrowed argument made owned, for a call that crosses a process boundary.
#[doc(hidden)]
pub trait Own {
    type Owned;
    fn own(self) -> Self::Owned;
}

/// A return value: std type ↔ stable-ABI type.
#[doc(hidden)]
pub trait Ret: Sized {
    type Ffi;
    fn into_ffi(self) -> Self::Ffi;
    fn from_ffi(ffi: Self::Ffi) -> Self;
}

impl<'a> ToFfi for &'a str {
    type Ffi = RStr<'a>;
    fn to_ffi(self) -> RStr<'a> {
        RStr::from(self)
    }
}
impl<'a> FromFfi for RStr<'a> {
    type Held = &'a str;
    fn hold(self) -> &'a str {
        self.as_str()
    }
}
impl<'a: 'b, 'b> Lend<'b> for &'a str {
    type Out = &'a str;
    fn lend(&'b self) -> &'a str {
        self
    }
}
impl<'b> Lend<'b> for String {
    type Out = &'b str;
    fn lend(&'b self) -> &'b str {
        self
    }
}
impl Own for &str {
    type Owned = String;
    fn own(self) -> String {
        self.to_owned()
    }
}

impl<'a> ToFfi for &'a [u8] {
    type Ffi = RSlice<'a, u8>;
    fn to_ffi(self) -> RSlice<'a, u8> {
        RSlice::from(self)
    }
}
impl<'a> FromFfi for RSlice<'a, u8> {
    type Held = &'a [u8];
    fn hold(self) -> &'a [u8] {
        self.as_slice()
    }
}
impl<'a: 'b, 'b> Lend<'b> for &'a [u8] {
    type Out = &'a [u8];
    fn lend(&'b self) -> &'a [u8] {
        self
    }
}
impl<'b> Lend<'b> for Vec<u8> {
    type Out = &'b [u8];
    fn lend(&'b self) -> &'b [u8] {
        self
    }
}
impl Own for &[u8] {
    type Owned = Vec<u8>;
    fn own(self) -> Vec<u8> {
        self.to_vec()
    }
}

/// Plain numbers cross as themselves.
macro_rules! by_value {
    ($($t:ty),*) => {$(
        impl ToFfi for $t {
            type Ffi = $t;
            fn to_ffi(self) -> $t {
                self
            }
        }
        impl FromFfi for $t {
            type Held = $t;
            fn hold(self) -> $t {
                self
            }
        }
        impl Lend<'_> for $t {
            type Out = $t;
            fn lend(&self) -> $t {
                *self
            }
        }
        impl Own for $t {
            type Owned = $t;
            fn own(self) -> $t {
                self
            }
        }
    )*};
}
by_value!(u64, u32, i64, bool);

impl Ret for () {
    type Ffi = ();
    fn into_ffi(self) {}
    fn from_ffi((): ()) {}
}
impl Ret for u64 {
    type Ffi = u64;
    fn into_ffi(self) -> u64 {
        self
    }
    fn from_ffi(ffi: u64) -> u64 {
        ffi
    }
}
impl Ret for Vec<u8> {
    type Ffi = RVec<u8>;
    fn into_ffi(self) -> RVec<u8> {
        RVec::from(self)
    }
    fn from_ffi(ffi: RVec<u8>) -> Vec<u8> {
        ffi.into_vec()
    }
}
impl Ret for String {
    type Ffi = RString;
    fn into_ffi(self) -> RString {
        RString::from(self)
    }
    fn from_ffi(ffi: RString) -> String {
        ffi.into_string()
    }
}

/// Implements [`Ret`] for a record type, its vector, and [`ToFfi`]/[`FromFfi`]/[`Lend`]/[`Own`] for a
/// borrowed record argument, given `From` conversions both ways between the record and its mirror.
macro_rules! record_conversions {
    ($std:ty => $ffi:ty) => {
        impl $crate::interface::Ret for $std {
            type Ffi = $ffi;
            fn into_ffi(self) -> $ffi {
                <$ffi>::from(self)
            }
            fn from_ffi(ffi: $ffi) -> $std {
                <$std>::from(ffi)
            }
        }
        impl $crate::interface::Ret for Vec<$std> {
            type Ffi = abi_stable::std_types::RVec<$ffi>;
            fn into_ffi(self) -> abi_stable::std_types::RVec<$ffi> {
                self.into_iter().map(<$ffi>::from).collect()
            }
            fn from_ffi(ffi: abi_stable::std_types::RVec<$ffi>) -> Vec<$std> {
                ffi.into_iter().map(<$std>::from).collect()
            }
        }
        impl<'a> $crate::interface::ToFfi for &'a $std {
            type Ffi = $ffi;
            fn to_ffi(self) -> $ffi {
                <$ffi>::from(self.clone())
            }
        }
        impl $crate::interface::FromFfi for $ffi {
            type Held = $std;
            fn hold(self) -> $std {
                <$std>::from(self)
            }
        }
        impl<'b> $crate::interface::Lend<'b> for $std {
            type Out = &'b $std;
            fn lend(&'b self) -> &'b $std {
                self
            }
        }
        impl $crate::interface::Own for &$std {
            type Owned = $std;
            fn own(self) -> $std {
                self.clone()
            }
        }
    };
}
pub(crate) use record_conversions;

/// A trait method declaration, with or without a default body.
#[doc(hidden)]
#[macro_export]
macro_rules! __author_fn {
    ($(#[$meta:meta])* fn $name:ident($($args:tt)*) -> $ret:ty) => {
        $(#[$meta])* fn $name($($args)*) -> $ret;
    };
    ($(#[$meta:meta])* fn $name:ident($($args:tt)*) -> $ret:ty $body:block) => {
        $(#[$meta])* fn $name($($args)*) -> $ret $body
    };
}

/// Generates everything one driver kind needs from one list of methods. See the module documentation
/// for the rules; each method parameter is written `name: AuthorType => FfiType, OwnedType`, each return
/// `AuthorType => FfiType`.
macro_rules! driver_interface {
    (
        $(#[$kind_meta:meta])*
        kind $kind:ident = $kind_value:expr, $kind_name:literal: $Author:ident, $Client:ident, $Adapter:ident, $Ffi:ident, $FfiTO:ident;
        host $Iface:ident, $Call:ident, $Reply:ident, $Remote:ident, $Method:ident;
        methods {
            $(
                $(#[$m_meta:meta])*
                fn $m:ident($($p:ident: $t:ty => $f:ty, $o:ty),*) -> $r:ty => $fr:ty $(, default $def:block)?;
            )*
        }
        extensions {
            $(
                $(#[$x_meta:meta])*
                $x_id:literal => $XFfi:ident, $XFfiTO:ident, $x_field:ident {
                    $(
                        $(#[$xm_meta:meta])*
                        fn $xm:ident($($xp:ident: $xt:ty => $xf:ty, $xo:ty),*) -> $xr:ty => $xfr:ty, default $xdef:block;
                    )*
                }
            )*
        }
    ) => {
        $(#[$kind_meta])*
        pub trait $Author: Send + Sync + 'static {
            /// Called once after construction, before any other call. An error makes the backend report
            /// down, with this error as the reason.
            fn init(&self) -> Result<(), $crate::DriverError> {
                Ok(())
            }
            /// Called once when the host stops or retires the driver, after its last call.
            fn cleanup(&self) -> Result<(), $crate::DriverError> {
                Ok(())
            }
            /// Called periodically; an error means the backend is unhealthy and says why.
            fn health(&self) -> Result<(), $crate::DriverError> {
                Ok(())
            }
            $(
                $crate::__author_fn! {
                    $(#[$m_meta])* fn $m(&self, $($p: $t),*) -> Result<$r, $crate::DriverError> $($def)?
                }
            )*
            $($(
                $crate::__author_fn! {
                    $(#[$xm_meta])* fn $xm(&self, $($xp: $xt),*) -> Result<$xr, $crate::DriverError> $xdef
                }
            )*)*
        }

        #[allow(non_local_definitions, missing_docs, clippy::undocumented_unsafe_blocks, non_camel_case_types)]
        pub(crate) mod ffi {
            use super::*;
            use abi_stable::std_types::RResult;

            /// The frozen stable-ABI object behind the author trait.
            #[abi_stable::sabi_trait]
            pub trait $Ffi: Send + Sync {
                $( fn $m(&self, $($p: $f),*) -> RResult<$fr, $crate::DriverError>; )*
            }

            $(
                $(#[$x_meta])*
                #[abi_stable::sabi_trait]
                pub trait $XFfi: Send + Sync {
                    $( fn $xm(&self, $($xp: $xf),*) -> RResult<$xfr, $crate::DriverError>; )*
                }
            )*
        }

        /// Plugin side: the author's driver (in one `RArc` shared by every stable-ABI object made from
        /// it); every call runs inside the panic guard.
        #[doc(hidden)]
        pub struct $Adapter<D>(D);

        #[allow(clippy::unused_unit)]
        impl<D: $Author> ffi::$Ffi for $Adapter<D> {
            $(
                fn $m(&self, $($p: $f),*) -> abi_stable::std_types::RResult<$fr, $crate::DriverError> {
                    $( let $p = $crate::interface::FromFfi::hold($p); )*
                    $crate::panic::guard(|| {
                        self.0.$m($($crate::interface::Lend::lend(&$p)),*).map($crate::interface::Ret::into_ffi)
                    })
                }
            )*
        }

        $(
            #[allow(clippy::unused_unit)]
            impl<D: $Author> ffi::$XFfi for $Adapter<D> {
                $(
                    fn $xm(&self, $($xp: $xf),*) -> abi_stable::std_types::RResult<$xfr, $crate::DriverError> {
                        $( let $xp = $crate::interface::FromFfi::hold($xp); )*
                        $crate::panic::guard(|| {
                            self.0.$xm($($crate::interface::Lend::lend(&$xp)),*).map($crate::interface::Ret::into_ffi)
                        })
                    }
                )*
            }
        )*

        impl<D: $Author> $crate::interface::ffi::DriverBaseFfi for $Adapter<D> {
            fn init(&self) -> abi_stable::std_types::RResult<(), $crate::DriverError> {
                $crate::panic::guard(|| self.0.init())
            }
            fn cleanup(&self) -> abi_stable::std_types::RResult<(), $crate::DriverError> {
                $crate::panic::guard(|| self.0.cleanup())
            }
            fn health(&self) -> abi_stable::std_types::RResult<(), $crate::DriverError> {
                $crate::panic::guard(|| self.0.health())
            }
        }

        /// The kind's part of every library: what the export macro and the host's registry use.
        #[doc(hidden)]
        pub mod __kind {
            use super::*;

            /// This kind.
            pub const KIND: $crate::DriverKind = $crate::DriverKind::from_raw($kind_value);
            /// Its name.
            pub const NAME: &str = $kind_name;
            /// The frozen object every driver of this kind hands over.
            pub type Object = ffi::$FfiTO<'static, abi_stable::std_types::RArc<()>>;
            /// Each method's parameter names (after `self`), for messages about a layout mismatch.
            pub const PARAMS: &[(&str, &[&str])] =
                &[$( (stringify!($m), &[$(stringify!($p)),*]), )* $($( (stringify!($xm), &[$(stringify!($xp)),*]), )*)*];
            /// The layout of [`Object`], recorded in the library's root module.
            pub const LAYOUT: &abi_stable::type_layout::TypeLayout = <Object as abi_stable::StableAbi>::LAYOUT;

            /// Runs the author's constructor inside the panic guard and hands the driver over.
            pub fn construct<D: $Author>(
                raw: $crate::RawOptions<'_>,
                schema: &'static [$crate::OptionSpec],
                new: fn(&$crate::Options) -> Result<D, $crate::DriverError>,
            ) -> abi_stable::std_types::RResult<$crate::interface::RawDriver, $crate::DriverError> {
                let options = $crate::Options::from_raw(raw, schema);
                $crate::panic::guard(|| Ok(raw_driver(new(&options)?)))
            }

            /// Hands a driver over: one shared value, every object made from it.
            pub(crate) fn raw_driver<D: $Author>(driver: D) -> $crate::interface::RawDriver {
                let shared = abi_stable::std_types::RArc::new($Adapter(driver));
                $crate::interface::RawDriver {
                    base: $crate::interface::ffi::DriverBaseFfi_TO::from_ptr(shared.clone(), abi_stable::sabi_trait::TD_Opaque),
                    extensions: abi_stable::std_types::RVec::from(vec![$(
                        abi_stable::std_types::Tuple2(
                            abi_stable::std_types::RStr::from_str($x_id),
                            $crate::interface::RawObject::new(ffi::$XFfiTO::from_ptr(shared.clone(), abi_stable::sabi_trait::TD_Opaque)),
                        ),
                    )*]),
                    object: $crate::interface::RawObject::new(Object::from_ptr(shared, abi_stable::sabi_trait::TD_Opaque)),
                }
            }
        }

        #[doc = concat!("A constructed ", $kind_name, " driver: from a loaded library (host side) or compiled into")]
        #[doc = concat!("this process (`", stringify!($Client), "::in_process`). It implements [`", stringify!($Author), "`] by calling")]
        #[doc = "through the stable ABI; a `&[u8]` argument crosses as a pointer and a length, without copying."]
        pub struct $Client {
            base: $crate::interface::DriverBaseBox,
            object: __kind::Object,
            $( $x_field: Option<ffi::$XFfiTO<'static, abi_stable::std_types::RArc<()>>>, )*
        }

        impl std::fmt::Debug for $Client {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($Client))
                    $( .field(stringify!($x_field), &self.$x_field.is_some()) )*
                    .finish_non_exhaustive()
            }
        }

        impl $Client {
            /// Wraps a driver compiled into this process, through the same stable-ABI objects and panic
            /// guard as a loaded library (for a driver's own tests, the conformance suite, benchmarks).
            pub fn in_process<D: $Author>(driver: D) -> $Client {
                let raw = __kind::raw_driver(driver);
                // SAFETY: made just above by this very crate: every layout is the one expected.
                unsafe { $Client::from_raw_unchecked(raw) }
            }

            /// Unwraps a raw driver without checking layouts.
            ///
            /// # Safety
            /// Every object in `raw` must have the layout this crate expects.
            unsafe fn from_raw_unchecked(raw: $crate::interface::RawDriver) -> $Client {
                let $crate::interface::RawDriver { base, object, extensions } = raw;
                #[allow(unused_mut, unused_variables)]
                let mut extensions: Vec<_> = extensions.into_iter().map(|t| (t.0, t.1)).collect();
                $(
                    let $x_field = extensions
                        .iter()
                        .position(|(id, _)| id.as_str() == $x_id)
                        .map(|i| extensions.swap_remove(i).1)
                        // SAFETY: the caller guarantees the layout.
                        .map(|raw| unsafe { raw.into_typed::<ffi::$XFfiTO<'static, abi_stable::std_types::RArc<()>>>() });
                )*
                // SAFETY: the caller guarantees the layout.
                let object = unsafe { object.into_typed::<__kind::Object>() };
                $Client { base, object, $($x_field,)* }
            }

            /// Host side: a constructed driver from a loaded library. Checks the layout of the kind's
            /// object (unless it is the one checked when the library was loaded) and of each extension.
            #[cfg(feature = "host")]
            pub(crate) fn from_raw(
                raw: $crate::interface::RawDriver,
                checked: &'static abi_stable::type_layout::TypeLayout,
            ) -> Result<$Client, String> {
                if !std::ptr::eq(raw.object.layout(), checked) {
                    $crate::host::check_layout(__kind::LAYOUT, raw.object.layout())?;
                }
                for t in raw.extensions.iter() {
                    let expected: Option<&'static abi_stable::type_layout::TypeLayout> = match t.0.as_str() {
                        $( $x_id => Some(<ffi::$XFfiTO<'static, abi_stable::std_types::RArc<()>> as abi_stable::StableAbi>::LAYOUT), )*
                        _ => None,
                    };
                    if let Some(expected) = expected {
                        $crate::host::check_layout(expected, t.1.layout()).map_err(|e| format!("extension {:?}: {e}", t.0.as_str()))?;
                    }
                }
                // SAFETY: the kind's object was checked when the library was loaded (the same static) or
                // just above, and every extension this host knows was checked just above; the others are
                // dropped unread.
                Ok(unsafe { $Client::from_raw_unchecked(raw) })
            }

            /// The ids of the extensions this driver provides.
            pub fn extensions(&self) -> Vec<&'static str> {
                #[allow(unused_mut)]
                let mut out = Vec::new();
                $( if self.$x_field.is_some() { out.push($x_id); } )*
                out
            }
        }

        #[allow(clippy::unused_unit)]
        impl $Author for $Client {
            fn init(&self) -> Result<(), $crate::DriverError> {
                self.base.init().into_result()
            }
            fn cleanup(&self) -> Result<(), $crate::DriverError> {
                self.base.cleanup().into_result()
            }
            fn health(&self) -> Result<(), $crate::DriverError> {
                self.base.health().into_result()
            }
            $(
                #[inline]
                fn $m(&self, $($p: $t),*) -> Result<$r, $crate::DriverError> {
                    self.object.$m($($crate::interface::ToFfi::to_ffi($p)),*).into_result().map($crate::interface::Ret::from_ffi)
                }
            )*
            $($(
                fn $xm(&self, $($xp: $xt),*) -> Result<$xr, $crate::DriverError> {
                    match &self.$x_field {
                        Some(x) => x.$xm($($crate::interface::ToFfi::to_ffi($xp)),*).into_result().map($crate::interface::Ret::from_ffi),
                        None => $xdef,
                    }
                }
            )*)*
        }

        /// The methods of this kind, numbered, for call statistics (lifecycle methods first).
        #[cfg(feature = "host")]
        #[allow(non_camel_case_types, missing_docs)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $Method {
            init,
            cleanup,
            health,
            $( $m, )*
            $($( $xm, )*)*
        }

        /// A call of one method with owned arguments: what crosses a process boundary.
        #[cfg(feature = "host")]
        #[allow(non_camel_case_types, missing_docs)]
        #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
        pub enum $Call {
            init,
            cleanup,
            health,
            $( $m { $($p: $o),* }, )*
            $($( $xm { $($xp: $xo),* }, )*)*
        }

        /// The answer to a call, of the same method.
        #[cfg(feature = "host")]
        #[allow(non_camel_case_types, missing_docs)]
        #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
        pub enum $Reply {
            init(Result<(), $crate::DriverError>),
            cleanup(Result<(), $crate::DriverError>),
            health(Result<(), $crate::DriverError>),
            $( $m(Result<$r, $crate::DriverError>), )*
            $($( $xm(Result<$xr, $crate::DriverError>), )*)*
        }

        /// A driver of this kind served by another process, through a `Transport`.
        #[cfg(feature = "host")]
        pub struct $Remote(Box<dyn $crate::host::Transport<$Iface>>);

        #[cfg(feature = "host")]
        impl $Remote {
            fn ask(&self, call: $Call) -> Result<$Reply, $crate::DriverError> {
                self.0.call(call)
            }
        }

        #[cfg(feature = "host")]
        fn mismatched(method: &str) -> $crate::DriverError {
            $crate::DriverError::internal(format!("worker answered a call of {method} with another method's reply"))
        }

        #[cfg(feature = "host")]
        #[allow(clippy::unused_unit)]
        impl $Author for $Remote {
            fn init(&self) -> Result<(), $crate::DriverError> {
                match self.ask($Call::init)? { $Reply::init(r) => r, _ => Err(mismatched("init")) }
            }
            fn cleanup(&self) -> Result<(), $crate::DriverError> {
                match self.ask($Call::cleanup)? { $Reply::cleanup(r) => r, _ => Err(mismatched("cleanup")) }
            }
            fn health(&self) -> Result<(), $crate::DriverError> {
                match self.ask($Call::health)? { $Reply::health(r) => r, _ => Err(mismatched("health")) }
            }
            $(
                fn $m(&self, $($p: $t),*) -> Result<$r, $crate::DriverError> {
                    match self.ask($Call::$m { $($p: $crate::interface::Own::own($p)),* })? {
                        $Reply::$m(r) => r,
                        _ => Err(mismatched(stringify!($m))),
                    }
                }
            )*
            $($(
                fn $xm(&self, $($xp: $xt),*) -> Result<$xr, $crate::DriverError> {
                    match self.ask($Call::$xm { $($xp: $crate::interface::Own::own($xp)),* })? {
                        $Reply::$xm(r) => r,
                        _ => Err(mismatched(stringify!($xm))),
                    }
                }
            )*)*
        }

        /// This kind, as the host sees it.
        #[cfg(feature = "host")]
        #[derive(Debug, Clone, Copy)]
        pub struct $Iface;

        #[cfg(feature = "host")]
        impl $crate::host::Interface for $Iface {
            const KIND: $crate::DriverKind = __kind::KIND;
            const METHODS: &'static [&'static str] =
                &["init", "cleanup", "health", $(stringify!($m),)* $($(stringify!($xm),)*)*];
            type Object = dyn $Author;
            type Client = $Client;
            type Method = $Method;
            type Call = $Call;
            type Reply = $Reply;

            fn from_raw(
                raw: $crate::interface::RawDriver,
                checked: &'static abi_stable::type_layout::TypeLayout,
            ) -> Result<$crate::host::Constructed<$Iface>, String> {
                let client = $Client::from_raw(raw, checked)?;
                let extensions = client.extensions();
                Ok($crate::host::Constructed { driver: client, extensions })
            }
            #[inline(always)]
            fn as_object(client: &$Client) -> &(dyn $Author + 'static) {
                client
            }
            fn init(object: &dyn $Author) -> Result<(), $crate::DriverError> {
                object.init()
            }
            fn cleanup(object: &dyn $Author) -> Result<(), $crate::DriverError> {
                object.cleanup()
            }
            fn health(object: &dyn $Author) -> Result<(), $crate::DriverError> {
                object.health()
            }
            fn method(call: &$Call) -> $Method {
                match call {
                    $Call::init => $Method::init,
                    $Call::cleanup => $Method::cleanup,
                    $Call::health => $Method::health,
                    $( $Call::$m { .. } => $Method::$m, )*
                    $($( $Call::$xm { .. } => $Method::$xm, )*)*
                }
            }
            fn method_index(method: $Method) -> usize {
                method as usize
            }
            fn invoke(object: &dyn $Author, call: $Call) -> $Reply {
                match call {
                    $Call::init => $Reply::init(object.init()),
                    $Call::cleanup => $Reply::cleanup(object.cleanup()),
                    $Call::health => $Reply::health(object.health()),
                    $( $Call::$m { $($p),* } => $Reply::$m(object.$m($($crate::interface::Lend::lend(&$p)),*)), )*
                    $($( $Call::$xm { $($xp),* } => $Reply::$xm(object.$xm($($crate::interface::Lend::lend(&$xp)),*)), )*)*
                }
            }
            fn remote(transport: Box<dyn $crate::host::Transport<$Iface>>) -> Box<dyn $Author> {
                Box::new($Remote(transport))
            }
        }
    };
}
pub(crate) use driver_interface;

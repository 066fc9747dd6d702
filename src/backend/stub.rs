//! [`stub_backend!`]: the uninhabited device and storage types of a backend that is not compiled
//! in, so `Device::X` and `Storage::X` stay nameable in every build.

/// Defines `$device` (whose `new` returns `$err::NotCompiled`) and an uninhabited `$storage`,
/// both implementing the backend traits.
macro_rules! stub_backend {
    ($device:ident, $storage:ident, $err:ident, $feature:literal, ($($arg:ident: $ty:ty),*)) => {
        #[doc = concat!("A device of this backend (stub: kvtier was built without the `", $feature, "` feature).")]
        #[derive(Debug, Clone)]
        pub struct $device {
            _never: Never,
        }

        #[derive(Debug, Clone, Copy)]
        enum Never {}

        impl $device {
            #[doc = concat!("Always fails: kvtier was built without the `", $feature, "` feature.")]
            pub fn new($(_: $ty),*) -> $crate::error::Result<Self> {
                Err($err::NotCompiled.into())
            }
        }

        /// Page pools of this backend (stub: uninhabited).
        pub enum $storage {}

        impl $crate::backend::BackendDevice for $device {
            type Storage = $storage;
            fn location(&self) -> $crate::backend::DeviceLocation {
                match self._never {}
            }
            fn storage(
                &self,
                _: &$crate::config::CacheConfig,
                _: usize,
            ) -> $crate::error::Result<$storage> {
                match self._never {}
            }
        }

        impl $crate::backend::BackendStorage for $storage {
            fn location(&self) -> $crate::backend::DeviceLocation {
                match *self {}
            }
            fn alloc_hot(&mut self) -> $crate::error::Result<u32> {
                match *self {}
            }
            fn write_hot(
                &mut self,
                _: u32,
                _: usize,
                _: &[f32],
                _: &[f32],
                _: usize,
            ) -> $crate::error::Result<()> {
                match *self {}
            }
            fn demote(
                &mut self,
                _: u32,
                _: usize,
                _: $crate::quant::WarmFormat,
            ) -> $crate::error::Result<Option<u32>> {
                match *self {}
            }
            fn supports_format(&self, _: $crate::quant::WarmFormat) -> bool {
                match *self {}
            }
            fn free(&mut self, _: $crate::cache::Tier, _: u32) {
                match *self {}
            }
            fn read_page(
                &self,
                _: &$crate::cache::PageEntry,
            ) -> $crate::error::Result<(Vec<f32>, Vec<f32>)> {
                match *self {}
            }
            fn attend(
                &self,
                _: &mut $crate::backend::Scratch,
                _: &$crate::backend::AttendInput,
            ) -> $crate::error::Result<$crate::attention::Attention> {
                match *self {}
            }
            fn prefill(
                &self,
                _: &$crate::cache::PageTable,
                _: &[f32],
                _: &[f32],
                _: &[f32],
                _: usize,
            ) -> $crate::error::Result<Vec<f32>> {
                match *self {}
            }
            fn bytes(&self) -> $crate::backend::StorageBytes {
                match *self {}
            }
        }
    };
}
pub(crate) use stub_backend;

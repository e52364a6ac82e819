//! The exports an NBD server offers: name -> block device, with per-export flags.
//!
//! Exports can be added and removed while the server runs (a volume is attached
//! or detached); a connection that already chose an export keeps its `Arc` to it
//! until it ends. The registry is read on every handshake and rarely written, so
//! it is a plain `RwLock` over a sorted map (sorted so `NBD_OPT_LIST` is stable).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use super::order::WriteOrder;
use super::proto::MAX_STRING_BYTES;
use crate::blockdev::BlockDevice;

/// How an export is offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// The name clients ask for (1..=4096 bytes of UTF-8, no NUL).
    pub name: String,
    /// Free text shown by `nbdinfo` (`NBD_INFO_DESCRIPTION`).
    pub description: String,
    /// Refuse writes with `EPERM` and advertise `NBD_FLAG_READ_ONLY`.
    pub read_only: bool,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`. Set it only when the device makes
    /// every write visible to all connections when it completes and its flush
    /// covers writes completed on any connection (true of every Slate device:
    /// a write is acknowledged once durable on the replicas).
    pub multi_conn: bool,
}

impl ExportConfig {
    /// A read-write export with multi-conn on.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), description: String::new(), read_only: false, multi_conn: true }
    }
}

/// Why an export could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// The name is empty, too long or contains NUL.
    #[error("invalid export name")]
    InvalidName,
    /// An export with this name exists.
    #[error("export {0:?} already exists")]
    Exists(String),
    /// The device's block size is not a power of two up to 64 KiB, or its size is not a multiple of it.
    #[error("device geometry unsupported: block size {block_size}, size {size_bytes}")]
    Geometry {
        /// The device's block size.
        block_size: u32,
        /// The device's size.
        size_bytes: u64,
    },
}

/// One export: its configuration, its device and the ordering of its writes.
pub struct Export {
    pub(crate) config: ExportConfig,
    pub(crate) device: Arc<dyn BlockDevice>,
    pub(crate) order: Arc<WriteOrder>,
}

impl fmt::Debug for Export {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Export")
            .field("config", &self.config)
            .field("size_bytes", &self.device.size_bytes())
            .finish_non_exhaustive()
    }
}

impl Export {
    /// The export's configuration.
    pub fn config(&self) -> &ExportConfig {
        &self.config
    }

    /// The device behind the export.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    /// Mutating requests (all connections) registered and not yet completed.
    pub fn writes_in_flight(&self) -> usize {
        self.order.in_flight()
    }
}

#[derive(Debug, Default)]
struct Inner {
    exports: BTreeMap<String, Arc<Export>>,
    default: Option<String>,
}

/// The set of exports a server offers, shared between the server and whoever attaches volumes.
#[derive(Debug, Default)]
pub struct ExportRegistry {
    inner: RwLock<Inner>,
}

impl ExportRegistry {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Offer `device` under `config.name`.
    pub fn add(&self, config: ExportConfig, device: Arc<dyn BlockDevice>) -> Result<Arc<Export>, ExportError> {
        if config.name.is_empty() || config.name.len() > MAX_STRING_BYTES || config.name.contains('\0') {
            return Err(ExportError::InvalidName);
        }
        let bs = device.block_size();
        if !bs.is_power_of_two() || bs > 65536 || !device.size_bytes().is_multiple_of(u64::from(bs)) {
            return Err(ExportError::Geometry { block_size: bs, size_bytes: device.size_bytes() });
        }
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if inner.exports.contains_key(&config.name) {
            return Err(ExportError::Exists(config.name));
        }
        let export = Arc::new(Export { config, device, order: Arc::default() });
        inner.exports.insert(export.config.name.clone(), Arc::clone(&export));
        Ok(export)
    }

    /// Stop offering `name` (connections already using it keep it until they end).
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if inner.default.as_deref() == Some(name) {
            inner.default = None;
        }
        inner.exports.remove(name)
    }

    /// Serve `name` to clients that ask for the empty (default) export name.
    /// Without one, the empty name means the only export when there is exactly one.
    pub fn set_default(&self, name: Option<&str>) {
        self.inner.write().unwrap_or_else(PoisonError::into_inner).default = name.map(str::to_owned);
    }

    /// Find an export by the name a client sent ("" = the default export).
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        if name.is_empty() {
            if let Some(d) = &inner.default {
                return inner.exports.get(d).cloned();
            }
            if inner.exports.len() == 1 {
                return inner.exports.values().next().cloned();
            }
            return None;
        }
        inner.exports.get(name).cloned()
    }

    /// Every export, sorted by name.
    pub fn list(&self) -> Vec<Arc<Export>> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).exports.values().cloned().collect()
    }
}

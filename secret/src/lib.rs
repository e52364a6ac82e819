//! Memory for long-lived key material.
//!
//! [`Secret<T>`] keeps one value in its own anonymous, page-aligned mapping that is
//! marked `MADV_DONTDUMP` (left out of core dumps, including those a crash handler
//! or `gcore` writes), locked in RAM with `mlock` where `RLIMIT_MEMLOCK` allows
//! (best effort: a failure leaves the page swappable but still out of dumps), and
//! overwritten with zeros before it is unmapped. `Debug` never shows the value.
//!
//! A page per value is wasteful for small keys but keeps the rule simple: nothing
//! else ever shares the page, so no unrelated allocation is dropped from dumps and
//! no key lives in a page the allocator hands out again.
//!
//! What this does not cover: copies made *before* the value reaches the secret page
//! (a value built on the stack and moved in by [`Secret::new`]; byte keys should be
//! filled in place through [`Secret::zeroed`] instead), and reads of live memory by
//! root or a ptrace-capable process.

mod page;

use std::fmt;
use std::ops::{Deref, DerefMut};

pub use page::mapping_flags;

/// One value in a private, dump-excluded, zeroed-on-drop page. See the crate docs.
pub struct Secret<T> {
    page: page::Page<T>,
}

impl<T> Secret<T> {
    /// Moves `value` into a fresh secret page.
    pub fn new(value: T) -> Self {
        Self { page: page::Page::new(value) }
    }

    /// Whether `mlock` succeeded for this page (it is best effort).
    pub fn is_locked(&self) -> bool {
        self.page.locked()
    }
}

impl<const N: usize> Secret<[u8; N]> {
    /// A secret byte array, all zeros: fill it in place so the key never sits on the stack.
    pub fn zeroed() -> Self {
        Self::new([0u8; N])
    }

    /// A copy of `bytes` (which the caller should wipe if it was a key).
    pub fn from_slice(bytes: &[u8; N]) -> Self {
        let mut s = Self::zeroed();
        s.copy_from_slice(bytes);
        s
    }
}

impl<const N: usize> Clone for Secret<[u8; N]> {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

impl<T> Deref for Secret<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.page.get()
    }
}

impl<T> DerefMut for Secret<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.page.get_mut()
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl<T> zeroize::ZeroizeOnDrop for Secret<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[test]
    fn secret_pages_are_left_out_of_core_dumps() {
        let mut key = Secret::<[u8; 32]>::zeroed();
        key[0] = 0x5a;
        let flags = mapping_flags(key.as_ptr() as usize).expect("the secret's mapping is in smaps");
        assert!(flags.iter().any(|f| f == "dd"), "VmFlags of the secret page: {flags:?}");
        // Control: an ordinary large heap allocation has its own mapping, without `dd`.
        let plain = vec![1u8; 4 << 20];
        let flags = mapping_flags(plain.as_ptr() as usize).expect("the heap mapping is in smaps");
        assert!(!flags.iter().any(|f| f == "dd"), "an ordinary allocation must not be dd: {flags:?}");
        assert_eq!(key[0], 0x5a);
    }

    #[test]
    fn the_page_is_unmapped_after_drop_and_the_value_dropped() {
        struct Counted(Rc<Cell<u32>>);
        impl Drop for Counted {
            fn drop(&mut self) {
                self.0.set(self.0.get() + 1);
            }
        }
        let drops = Rc::new(Cell::new(0));
        let s = Secret::new(Counted(drops.clone()));
        let addr = std::ptr::from_ref(&*s) as usize;
        assert!(mapping_flags(addr).is_some());
        drop(s);
        assert_eq!(drops.get(), 1, "the value's own Drop ran once");
        assert!(mapping_flags(addr).is_none(), "the secret page is unmapped after drop");
    }

    #[test]
    fn clone_and_debug() {
        let mut a = Secret::<[u8; 64]>::zeroed();
        a[63] = 7;
        let b = a.clone();
        assert_eq!(b[63], 7);
        assert_ne!(a.as_ptr(), b.as_ptr(), "a clone has its own page");
        assert_eq!(format!("{a:?}"), "Secret([redacted])");
    }
}

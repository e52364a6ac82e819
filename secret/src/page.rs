//! The one place with `unsafe`: a typed value in its own anonymous mapping.
#![allow(unsafe_code)]

use std::marker::PhantomData;
use std::ptr::NonNull;

use zeroize::Zeroize;

pub(crate) struct Page<T> {
    ptr: NonNull<T>,
    len: usize,
    locked: bool,
    _owns: PhantomData<T>,
}

// SAFETY: `Page<T>` owns its `T` exactly like a `Box<T>` does (the mapping is private to
// this value and freed only in `Drop`), so it is `Send`/`Sync` exactly when `T` is.
unsafe impl<T: Send> Send for Page<T> {}
// SAFETY: as above; shared access only hands out `&T`.
unsafe impl<T: Sync> Sync for Page<T> {}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions; it reads a constant of the running system.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|n| *n > 0).unwrap_or(4096)
}

impl<T> Page<T> {
    pub(crate) fn new(value: T) -> Self {
        let page = page_size();
        assert!(std::mem::align_of::<T>() <= page, "a secret's alignment must fit in a page");
        let len = std::mem::size_of::<T>().max(1).div_ceil(page) * page;
        // SAFETY: an anonymous private mapping with no address hint and no file has no
        // preconditions; the result is checked against MAP_FAILED before any use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(addr != libc::MAP_FAILED, "mapping a page for a secret failed: {}", std::io::Error::last_os_error());
        // SAFETY: `addr..addr+len` is the mapping made just above, owned by nobody else.
        // MADV_DONTDUMP only changes what a core dump includes; mlock only pins the pages.
        // A failure of either is reported by the return value and leaves the memory valid.
        let (dontdump, locked) =
            unsafe { (libc::madvise(addr, len, libc::MADV_DONTDUMP) == 0, libc::mlock(addr, len) == 0) };
        assert!(dontdump, "MADV_DONTDUMP on a secret page failed: {}", std::io::Error::last_os_error());
        let ptr = NonNull::new(addr.cast::<T>()).expect("mmap does not return null on success");
        // SAFETY: the mapping is page-aligned (so aligned for T, checked above), at least
        // size_of::<T>() bytes long, writable, and holds no value yet.
        unsafe { ptr.as_ptr().write(value) };
        Self { ptr, len, locked, _owns: PhantomData }
    }

    pub(crate) fn get(&self) -> &T {
        // SAFETY: `ptr` holds an initialized T from `new` until `drop`; `&self` keeps it alive.
        unsafe { self.ptr.as_ref() }
    }

    pub(crate) fn get_mut(&mut self) -> &mut T {
        // SAFETY: as in `get`, and `&mut self` makes this the only reference.
        unsafe { self.ptr.as_mut() }
    }

    pub(crate) fn locked(&self) -> bool {
        self.locked
    }
}

impl<T> Drop for Page<T> {
    fn drop(&mut self) {
        let addr = self.ptr.as_ptr().cast::<libc::c_void>();
        // SAFETY: the T written in `new` is dropped exactly once, here; afterwards the
        // mapping is only treated as `len` plain bytes, which it is, and then unmapped.
        // Nothing else refers to it: `Page` is never cloned and `&mut self` is unique.
        unsafe {
            std::ptr::drop_in_place(self.ptr.as_ptr());
            std::slice::from_raw_parts_mut(addr.cast::<u8>(), self.len).zeroize();
            if self.locked {
                libc::munlock(addr, self.len);
            }
            libc::munmap(addr, self.len);
        }
    }
}

/// The `VmFlags` of the mapping of this process that contains `addr`, from
/// `/proc/self/smaps` (`None` when no mapping contains it). For tests: a secret
/// page shows `dd` ("do not dump").
pub fn mapping_flags(addr: usize) -> Option<Vec<String>> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)) {
                inside = lo <= addr && addr < hi;
                continue;
            }
        }
        if inside {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                return Some(flags.split_whitespace().map(str::to_owned).collect());
            }
        }
    }
    None
}

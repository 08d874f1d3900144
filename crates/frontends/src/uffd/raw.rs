//! Raw kernel ABI: userfaultfd (`include/uapi/linux/userfaultfd.h`) and the PAGEMAP_SCAN ioctl
//! (`include/uapi/linux/fs.h`). Structs and most constants come from `linux-raw-sys`; the ioctl
//! numbers it lacks are computed here with the `_IOWR` encoding and checked against the ones it
//! has at compile time.

pub use linux_raw_sys::general::{
    page_region, pm_scan_arg, uffd_msg, uffdio_api, uffdio_copy, uffdio_poison, uffdio_range,
    uffdio_register, uffdio_writeprotect, uffdio_zeropage,
};

pub use linux_raw_sys::general::{
    PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC,
    PM_SCAN_WP_MATCHING, UFFDIO_COPY_MODE_DONTWAKE, UFFDIO_COPY_MODE_WP, UFFDIO_REGISTER_MODE_MISSING,
    UFFDIO_REGISTER_MODE_WP, UFFDIO_ZEROPAGE_MODE_DONTWAKE, UFFD_API, UFFD_EVENT_FORK, UFFD_EVENT_PAGEFAULT,
    UFFD_EVENT_REMAP, UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP, UFFD_FEATURE_EVENT_FORK, UFFD_FEATURE_EVENT_REMAP,
    UFFD_FEATURE_EVENT_REMOVE, UFFD_FEATURE_EVENT_UNMAP, UFFD_FEATURE_MISSING_SHMEM,
    UFFD_FEATURE_PAGEFAULT_FLAG_WP, UFFD_FEATURE_POISON, UFFD_FEATURE_SIGBUS, UFFD_FEATURE_THREAD_ID,
    UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_HUGETLBFS_SHMEM, UFFD_PAGEFAULT_FLAG_WP,
    UFFD_PAGEFAULT_FLAG_WRITE, UFFD_USER_MODE_ONLY,
};

/// `UFFDIO_WRITEPROTECT` modes (not exported by linux-raw-sys).
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
pub const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;

/// Bits of `uffdio_api.ioctls` / `uffdio_register.ioctls` (1 << `_UFFDIO_*`).
pub const IOCTL_BIT_COPY: u64 = 1 << linux_raw_sys::general::_UFFDIO_COPY;
pub const IOCTL_BIT_ZEROPAGE: u64 = 1 << linux_raw_sys::general::_UFFDIO_ZEROPAGE;
pub const IOCTL_BIT_WRITEPROTECT: u64 = 1 << linux_raw_sys::general::_UFFDIO_WRITEPROTECT;
pub const IOCTL_BIT_POISON: u64 = 1 << linux_raw_sys::general::_UFFDIO_POISON;

/// The `_IOWR(type, nr, size)` encoding of asm-generic/ioctl.h (x86-64, arm64, riscv).
const fn iowr(ty: u32, nr: u32, size: usize) -> u32 {
    const READ_WRITE: u32 = 3;
    (READ_WRITE << 30) | ((size as u32) << 16) | (ty << 8) | nr
}

const UFFDIO: u32 = linux_raw_sys::general::UFFDIO;

pub const UFFDIO_API: u32 = iowr(UFFDIO, linux_raw_sys::general::_UFFDIO_API, 24);
pub const UFFDIO_REGISTER: u32 = iowr(
    UFFDIO,
    linux_raw_sys::general::_UFFDIO_REGISTER,
    size_of::<uffdio_register>(),
);
pub const UFFDIO_UNREGISTER: u32 = 0x8000_0000
    | ((size_of::<uffdio_range>() as u32) << 16)
    | (UFFDIO << 8)
    | linux_raw_sys::general::_UFFDIO_UNREGISTER;
pub const UFFDIO_WAKE: u32 = 0x8000_0000
    | ((size_of::<uffdio_range>() as u32) << 16)
    | (UFFDIO << 8)
    | linux_raw_sys::general::_UFFDIO_WAKE;
pub const UFFDIO_COPY: u32 = iowr(
    UFFDIO,
    linux_raw_sys::general::_UFFDIO_COPY,
    size_of::<uffdio_copy>(),
);
pub const UFFDIO_ZEROPAGE: u32 = iowr(
    UFFDIO,
    linux_raw_sys::general::_UFFDIO_ZEROPAGE,
    size_of::<uffdio_zeropage>(),
);
pub const UFFDIO_WRITEPROTECT: u32 = iowr(
    UFFDIO,
    linux_raw_sys::general::_UFFDIO_WRITEPROTECT,
    size_of::<uffdio_writeprotect>(),
);
/// Not in linux-raw-sys' ioctl list: computed.
pub const UFFDIO_POISON: u32 = iowr(
    UFFDIO,
    linux_raw_sys::general::_UFFDIO_POISON,
    size_of::<uffdio_poison>(),
);
/// `_IOWR('f', 16, struct pm_scan_arg)` from include/uapi/linux/fs.h: computed.
pub const PAGEMAP_SCAN: u32 = iowr(b'f' as u32, 16, size_of::<pm_scan_arg>());

// Our encoding must agree with every number linux-raw-sys does export.
const _: () = {
    use linux_raw_sys::ioctl as k;
    assert!(UFFDIO_API == k::UFFDIO_API);
    assert!(UFFDIO_REGISTER == k::UFFDIO_REGISTER);
    assert!(UFFDIO_UNREGISTER == k::UFFDIO_UNREGISTER);
    assert!(UFFDIO_WAKE == k::UFFDIO_WAKE);
    assert!(UFFDIO_COPY == k::UFFDIO_COPY);
    assert!(UFFDIO_ZEROPAGE == k::UFFDIO_ZEROPAGE);
    assert!(UFFDIO_WRITEPROTECT == k::UFFDIO_WRITEPROTECT);
    assert!(size_of::<uffdio_poison>() == 32);
    assert!(size_of::<pm_scan_arg>() == 96);
    assert!(size_of::<page_region>() == 24);
    assert!(size_of::<uffd_msg>() == 32);
};

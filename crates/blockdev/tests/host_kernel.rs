//! Block-device frontends against the kernel this test runs on. Each device has a round trip
//! (skipped where the kernel lacks it) and a check of the error users get without it (skipped
//! where the kernel has it); the VM test (`guest_vm.rs`) runs the real devices in a kernel that
//! has both.

use std::sync::Arc;

use r3map_blockdev::nbd::genl::Genl;
use r3map_blockdev::{
    check_nbd_support, check_ublk_support, NbdDevice, NbdError, NbdOptions, UblkDevice, UblkError,
    UblkOptions,
};
use r3map_core::testing::skip;
use r3map_core::{Backend, MemoryBackend, SharedBackend};

fn backend() -> SharedBackend {
    Arc::new(MemoryBackend::new(8 << 20))
}

/// Our netlink messages work against the real kernel: the control family resolves itself.
#[test]
fn generic_netlink_resolves_the_control_family() {
    let mut genl = Genl::open().expect("generic netlink socket");
    assert_eq!(genl.family("nlctrl").expect("nlctrl family"), 0x10);
    let err = genl.family("r3map-nofam").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_device_round_trip_through_the_host_kernel() {
    let Ok(method) = check_nbd_support() else {
        return skip("this kernel has no NBD client (CONFIG_BLK_DEV_NBD); the guest VM test runs it");
    };
    let backend = backend();
    let device = NbdDevice::attach(backend.clone(), NbdOptions::default())
        .await
        .expect("attach");
    assert_eq!(device.method(), method);
    let path = device.path().to_owned();
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
        file.write_all_at(b"through the kernel", 4096)?;
        file.sync_all()
    })
    .await
    .unwrap()
    .expect("write through /dev/nbdX");
    device.disconnect().await.expect("disconnect");
    let mut buf = [0u8; 18];
    backend.read_at(4096, &mut buf).await.unwrap();
    assert_eq!(&buf, b"through the kernel");
}

#[tokio::test]
async fn nbd_without_the_kernel_client_names_the_missing_module() {
    let Err(unsupported) = check_nbd_support() else {
        return skip("this kernel has the NBD client: there is no refusal to check");
    };
    let text = unsupported.to_string();
    assert!(
        text.contains("CONFIG_BLK_DEV_NBD") && text.contains("--frontend disk"),
        "{text}"
    );
    let err = NbdDevice::attach(backend(), NbdOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, NbdError::Unsupported(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ublk_device_round_trip_through_the_host_kernel() {
    if check_ublk_support().is_err() {
        return skip("this kernel has no ublk (CONFIG_BLK_DEV_UBLK); the guest VM test runs it");
    }
    let backend = backend();
    let device = UblkDevice::start(backend.clone(), UblkOptions::default())
        .await
        .expect("start");
    let path = device.path().to_owned();
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
        file.write_all_at(b"through ublk", 8192)?;
        file.sync_all()
    })
    .await
    .unwrap()
    .expect("write through /dev/ublkbN");
    device.stop().await.expect("stop");
    let mut buf = [0u8; 12];
    backend.read_at(8192, &mut buf).await.unwrap();
    assert_eq!(&buf, b"through ublk");
}

#[tokio::test]
async fn ublk_without_the_driver_names_the_missing_module() {
    let Err(unsupported) = check_ublk_support() else {
        return skip("this kernel has ublk: there is no refusal to check");
    };
    let text = unsupported.to_string();
    assert!(text.contains("--frontend disk"), "{text}");
    let err = UblkDevice::start(backend(), UblkOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, UblkError::Unsupported(_)), "{err}");
}

#[tokio::test]
async fn ublk_options_are_validated_before_touching_the_kernel() {
    if check_ublk_support().is_err() {
        // Validation runs after the support check; nothing more to see without ublk.
        return skip("ublk option validation needs /dev/ublk-control (CONFIG_BLK_DEV_UBLK)");
    }
    let err = UblkDevice::start(
        backend(),
        UblkOptions {
            depth: 0,
            ..UblkOptions::default()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, UblkError::Options(_)), "{err}");
}

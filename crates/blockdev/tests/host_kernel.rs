//! Block-device frontends against the kernel this test runs on. Where the kernel lacks the
//! NBD client or ublk, the tests check the error users get and are reported as skipped; the VM
//! test (`guest_vm.rs`) runs the real devices in a kernel that has both.

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
async fn nbd_attach_or_names_the_missing_module() {
    match check_nbd_support() {
        Ok(method) => {
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
        Err(unsupported) => {
            let text = unsupported.to_string();
            assert!(
                text.contains("CONFIG_BLK_DEV_NBD") && text.contains("--frontend disk"),
                "{text}"
            );
            let err = NbdDevice::attach(backend(), NbdOptions::default())
                .await
                .unwrap_err();
            assert!(matches!(err, NbdError::Unsupported(_)), "{err}");
            skip(&format!("kernel NBD client: {unsupported}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ublk_start_or_names_the_missing_module() {
    match check_ublk_support() {
        Ok(()) => {
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
        Err(unsupported) => {
            let text = unsupported.to_string();
            assert!(text.contains("--frontend disk"), "{text}");
            let err = UblkDevice::start(backend(), UblkOptions::default())
                .await
                .unwrap_err();
            assert!(matches!(err, UblkError::Unsupported(_)), "{err}");
            skip(&format!("ublk: {unsupported}"));
        }
    }
}

#[tokio::test]
async fn ublk_options_are_validated_before_touching_the_kernel() {
    if check_ublk_support().is_err() {
        // Validation runs after the support check; nothing more to see without ublk.
        skip("ublk option validation needs /dev/ublk-control (CONFIG_BLK_DEV_UBLK)");
        return;
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

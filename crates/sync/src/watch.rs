//! Change events for one file from inotify: writes and closes after writing, and the file
//! being replaced (an editor's rename over it), watched through its directory.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::sync::mpsc;

/// Quiet time after an event before the file counts as changed.
pub const SETTLE: std::time::Duration = std::time::Duration::from_millis(20);
/// Longest a steady writer can postpone a hash pass.
pub const MAX_SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

/// Change events of one file, from an inotify instance read on a thread of its own (a blocking
/// read needs no unsafe registration with the async reactor).
pub struct FileWatch {
    events: mpsc::Receiver<io::Result<()>>,
}

const FILE_EVENTS: AddWatchFlags = AddWatchFlags::IN_MODIFY
    .union(AddWatchFlags::IN_CLOSE_WRITE)
    .union(AddWatchFlags::IN_ATTRIB)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF);
const DIR_EVENTS: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_CLOSE_WRITE);

impl FileWatch {
    /// Watches `path` (which must exist) and its directory.
    pub fn new(path: &Path) -> io::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC)?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        inotify.add_watch(dir, DIR_EVENTS)?;
        let file_watch = Some(inotify.add_watch(path, FILE_EVENTS)?);
        // One slot: events that arrive while the last one is being handled count once.
        let (tx, events) = mpsc::channel(1);
        let mut watcher = Watcher {
            inotify,
            path: path.to_path_buf(),
            name: path.file_name().unwrap_or_default().to_os_string(),
            file_watch,
        };
        std::thread::Builder::new()
            .name("r3map-sync-watch".into())
            .spawn(move || loop {
                let relevant = watcher.next();
                let failed = relevant.is_err();
                if tx.is_closed() {
                    return;
                }
                if !matches!(relevant, Ok(false))
                    && tx.try_send(relevant.map(|_| ())).is_err()
                    && tx.is_closed()
                {
                    return;
                }
                if failed {
                    return;
                }
            })?;
        Ok(Self { events })
    }

    /// Waits until the file may have changed and its writer paused: a burst of writes (events
    /// less than [`SETTLE`] apart, for at most [`MAX_SETTLE`]) counts once, so one hash pass and
    /// one version follow it instead of one per write.
    pub async fn changed(&mut self) -> io::Result<()> {
        self.next().await?;
        let deadline = tokio::time::Instant::now() + MAX_SETTLE;
        while let Ok(event) =
            tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + SETTLE), self.next()).await
        {
            event?;
        }
        Ok(())
    }

    async fn next(&mut self) -> io::Result<()> {
        match self.events.recv().await {
            Some(result) => result,
            None => Err(io::Error::other("the inotify thread stopped")),
        }
    }
}

struct Watcher {
    inotify: Inotify,
    path: PathBuf,
    name: OsString,
    file_watch: Option<WatchDescriptor>,
}

impl Watcher {
    /// Reads one batch of events; whether any concerns the file.
    fn next(&mut self) -> io::Result<bool> {
        let events = loop {
            match self.inotify.read_events() {
                Ok(events) => break events,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(err) => return Err(err.into()),
            }
        };
        let mut relevant = false;
        for event in events {
            if Some(event.wd) == self.file_watch {
                relevant = true;
                if event
                    .mask
                    .intersects(AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF)
                {
                    self.file_watch = None;
                }
            } else if event.name.as_deref() == Some(self.name.as_os_str()) {
                // The directory saw the file created or replaced: watch the new one.
                relevant = true;
                self.file_watch = self.inotify.add_watch(&self.path, FILE_EVENTS).ok();
            }
        }
        Ok(relevant)
    }
}

//! What a seeder does to the application around `sync`: suspend it, flush the frontend it
//! writes through, and resume it if the migration is aborted.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{MigrationError, Result};

/// An asynchronous callback; its error text is shown to the user.
pub type Hook =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = std::result::Result<(), String>> + Send>> + Send + Sync>;

/// Makes a [`Hook`] from an async closure.
pub fn hook<F, Fut>(f: F) -> Hook
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), String>> + Send + 'static,
{
    Arc::new(move || Box::pin(f()))
}

/// The seeder's callbacks. All are optional: a bare backend needs none.
#[derive(Clone, Default)]
pub struct SeederHooks {
    /// Stops the application (the downtime starts here).
    pub suspend: Option<Hook>,
    /// Lets the application run again (only after an abort).
    pub resume: Option<Hook>,
    /// Pushes writes the frontend still holds (page cache, a region's dirty pages) into the
    /// seeder's backend; runs before every dirty list is taken.
    pub flush: Option<Hook>,
}

impl std::fmt::Debug for SeederHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeederHooks")
            .field("suspend", &self.suspend.is_some())
            .field("resume", &self.resume.is_some())
            .field("flush", &self.flush.is_some())
            .finish()
    }
}

/// How long suspending a process may take until every thread has stopped.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

impl SeederHooks {
    /// Suspends process `pid` with SIGSTOP (waiting until every thread has stopped, so no
    /// system call of it is still in flight) and resumes it with SIGCONT.
    pub fn process(pid: u32) -> Self {
        Self {
            suspend: Some(hook(move || async move { stop_process(pid).await })),
            resume: Some(hook(move || async move {
                signal(pid, nix::sys::signal::Signal::SIGCONT)
            })),
            flush: None,
        }
    }

    /// Like [`SeederHooks::process`], for a process started after the seeder (e.g. one that
    /// uses the seeder's frontend): its pid is read from `path` at every suspend and resume.
    pub fn process_in_file(path: std::path::PathBuf) -> Self {
        let pid_in = move |path: std::path::PathBuf| async move {
            let text = tokio::fs::read_to_string(&path)
                .await
                .map_err(|err| format!("cannot read the pid file {}: {err}", path.display()))?;
            text.trim()
                .parse::<u32>()
                .map_err(|_| format!("the pid file {} holds no process id", path.display()))
        };
        let resume_path = path.clone();
        Self {
            suspend: Some(hook(move || {
                let path = path.clone();
                async move { stop_process(pid_in(path).await?).await }
            })),
            resume: Some(hook(move || {
                let path = resume_path.clone();
                async move { signal(pid_in(path).await?, nix::sys::signal::Signal::SIGCONT) }
            })),
            flush: None,
        }
    }

    /// Suspends and resumes by running shell commands (`sh -c`); a non-zero exit is an error.
    pub fn commands(suspend: Option<String>, resume: Option<String>) -> Self {
        let run = |command: Option<String>| command.map(|command| hook(move || run_command(command.clone())));
        Self {
            suspend: run(suspend),
            resume: run(resume),
            flush: None,
        }
    }

    /// The same hooks with `flush` as the frontend flush.
    pub fn with_flush(mut self, flush: Hook) -> Self {
        self.flush = Some(flush);
        self
    }

    pub(crate) async fn suspend(&self) -> Result<()> {
        call(&self.suspend, "suspend").await
    }
    pub(crate) async fn resume(&self) -> Result<()> {
        call(&self.resume, "resume").await
    }
    pub(crate) async fn flush(&self) -> Result<()> {
        call(&self.flush, "flush the frontend of").await
    }
}

async fn call(hook: &Option<Hook>, action: &'static str) -> Result<()> {
    match hook {
        Some(hook) => hook()
            .await
            .map_err(|reason| MigrationError::Application { action, reason }),
        None => Ok(()),
    }
}

fn signal(pid: u32, signal: nix::sys::signal::Signal) -> std::result::Result<(), String> {
    let raw = i32::try_from(pid).map_err(|_| format!("process id {pid} is out of range"))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), signal)
        .map_err(|err| format!("cannot send {signal} to process {pid}: {err}"))
}

async fn stop_process(pid: u32) -> std::result::Result<(), String> {
    signal(pid, nix::sys::signal::Signal::SIGSTOP)?;
    // A thread inside a system call (e.g. a write to a FUSE file this process serves) stops
    // only when the call returns; until then its write may still be on its way to us.
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        match all_threads_stopped(pid) {
            Ok(true) => return Ok(()),
            Ok(false) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(1)).await,
            Ok(false) => {
                return Err(format!(
                    "process {pid} did not stop within {STOP_TIMEOUT:?} (a thread is stuck in a system call)"
                ))
            }
            Err(err) => return Err(format!("cannot read the state of process {pid}: {err}")),
        }
    }
}

/// Whether every thread of `pid` is stopped (state `T` in /proc/PID/task/TID/stat).
fn all_threads_stopped(pid: u32) -> std::io::Result<bool> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = match std::fs::read_to_string(task?.path().join("stat")) {
            Ok(stat) => stat,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue, // the thread exited
            Err(err) => return Err(err),
        };
        // The state follows the parenthesised command name, which may itself hold spaces.
        let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
        if !matches!(state, Some('T') | Some('t') | Some('Z') | Some('X')) {
            return Ok(false);
        }
    }
    Ok(true)
}

async fn run_command(command: String) -> std::result::Result<(), String> {
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&command)
        .status()
        .await
        .map_err(|err| format!("cannot run {command:?}: {err}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{command:?} failed ({status})"))
    }
}

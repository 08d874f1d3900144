//! The README's "What you can do with it" recipes, run end to end with the figures they claim
//! (crates/cli/tests/cli_usecases.rs runs each and checks them):
//!
//! ```text
//! usecases sqlite [--trace CSV]      a SQLite database in an ext4 image, queried while it streams
//! usecases media [--trace CSV]       an MP4 with its index at the end, probed while it streams
//! usecases drive                     ext4 on a managed mount that keeps working without its remote
//! usecases sqlite-ranges IMAGE PATH  the --pull-ranges file for database PATH inside IMAGE
//! usecases mp4-ranges FILE           the --pull-ranges file for an MP4 (ftyp and moov first)
//! ```
//!
//! Each streaming case runs twice, sequential pull order and ranges-first, over the same thin
//! link (20 ms RTT, 8 MiB/s), and prints one `figure …` line per run. `--r3map PATH` picks the
//! binary (default: the one built next to this example). Needs root (FUSE, loop, mount).

mod drive;
mod layout;
mod procs;
mod stream;

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use procs::tool;
use stream::{Figures, Stream};

fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut option = |name: &str| -> Option<PathBuf> {
        let at = args.iter().position(|a| a == name)?;
        let value = args.get(at + 1).cloned();
        args.drain(at..(at + 2).min(args.len()));
        value.map(PathBuf::from)
    };
    let (r3map, trace) = (option("--r3map"), option("--trace"));
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["sqlite-ranges", image, db] => print!("{}", layout::print(&layout::sqlite(Path::new(image), db)?)),
        ["mp4-ranges", file] => print!("{}", layout::print(&layout::mp4(Path::new(file))?)),
        ["sqlite"] => streaming("sqlite", &procs::r3map_binary(r3map)?, trace, sqlite)?,
        ["media"] => streaming("media", &procs::r3map_binary(r3map)?, trace, media)?,
        ["drive"] => {
            let work = tempfile::Builder::new().prefix("r3map-usecase-").tempdir()?;
            drive::run(&procs::r3map_binary(r3map)?, work.path())?
        }
        _ => bail!("usage: usecases sqlite|media [--trace CSV] | drive [--r3map PATH] | sqlite-ranges IMAGE PATH | mp4-ranges FILE"),
    }
    Ok(())
}

/// A streaming case: prepares the resource, then runs it in both pull orders.
fn streaming(
    case: &str,
    r3map: &Path,
    trace: Option<PathBuf>,
    case_fn: fn(&Path, &Path) -> Result<Vec<Figures>>,
) -> Result<()> {
    let work = tempfile::Builder::new().prefix("r3map-usecase-").tempdir()?;
    let runs = case_fn(r3map, work.path())?;
    for run in &runs {
        run.print(case);
    }
    if let Some(path) = trace {
        stream::write_trace(&path, case, &runs)?;
    }
    Ok(())
}

/// Rows of the example table; row `i` has key `(i * 7919) % 200003` (distinct: 200003 is prime).
const ROWS: u64 = 200_000;
const PROBE_ROW: u64 = 123_457;

fn sqlite(r3map: &Path, work: &Path) -> Result<Vec<Figures>> {
    let dir = work.join("fs");
    std::fs::create_dir(&dir)?;
    let db = dir.join("app.db");
    tool(
        "sqlite3",
        &[
            db.to_str().unwrap_or_default(),
            &format!(
                "PRAGMA page_size=4096; CREATE TABLE t(id INTEGER PRIMARY KEY, key INTEGER, payload BLOB);
                 WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM c WHERE i<{ROWS})
                 INSERT INTO t SELECT i, (i*7919)%200003, randomblob(200) FROM c;
                 CREATE INDEX t_key ON t(key);"
            ),
        ],
    )?;
    let image = work.join("app.img");
    let db_size = std::fs::metadata(&db)?.len();
    let image_size = format!("{}k", (db_size * 3 / 2 + (8 << 20)) >> 10);
    tool(
        "mkfs.ext4",
        &[
            "-q",
            "-b",
            "4096",
            "-d",
            dir.to_str().unwrap_or_default(),
            image.to_str().unwrap_or_default(),
            &image_size,
        ],
    )?;
    let ranges = work.join("app.ranges");
    std::fs::write(&ranges, layout::print(&layout::sqlite(&image, "/app.db")?))?;

    let key = PROBE_ROW * 7919 % 200_003;
    let query = format!("SELECT id FROM t WHERE key = {key};");
    let fs = work.join("db");
    std::fs::create_dir(&fs)?;
    let reader = |device: &str| -> Result<()> {
        ensure!(
            device.starts_with("/dev/"),
            "the disk frontend mounted {device}, not a device"
        );
        let _unmount = procs::UnmountOnDrop(&fs);
        tool(
            "mount",
            // The type given: no probing of the device for other signatures (reads near its end).
            &[
                "-t",
                "ext4",
                "-o",
                "ro,noload",
                device,
                fs.to_str().unwrap_or_default(),
            ],
        )?;
        let answer = tool(
            "sqlite3",
            &[
                "-readonly",
                fs.join("app.db").to_str().unwrap_or_default(),
                &query,
            ],
        );
        tool("umount", &[fs.to_str().unwrap_or_default()])?;
        let answer = answer?.trim().to_string();
        ensure!(
            answer == PROBE_ROW.to_string(),
            "the query answered {answer:?}, not {PROBE_ROW}"
        );
        Ok(())
    };
    let mut runs = Vec::new();
    for ranges in [None, Some(ranges.as_path())] {
        let run = Stream {
            r3map,
            image: &image,
            frontend: "disk",
            ranges,
            work,
        };
        runs.push(run.run(reader)?);
    }
    Ok(runs)
}

fn media(r3map: &Path, work: &Path) -> Result<Vec<Figures>> {
    let movie = work.join("movie.mp4");
    // MP4 (not +faststart) writes the index, the moov box, after the media data.
    tool(
        "ffmpeg",
        &[
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            // Noise keeps the encoder from compressing it to nothing: ~60 MB.
            "testsrc2=size=640x360:rate=25,noise=alls=20:allf=t+u",
            "-t",
            "20",
            "-c:v",
            "mpeg4",
            "-q:v",
            "2",
            "-y",
            movie.to_str().unwrap_or_default(),
        ],
    )?;
    let ranges = work.join("movie.ranges");
    std::fs::write(&ranges, layout::print(&layout::mp4(&movie)?))?;
    let expected = probe(&movie)?;
    ensure!(
        expected.contains("codec_name=mpeg4"),
        "ffprobe of the local file: {expected}"
    );
    let mut runs = Vec::new();
    for ranges in [None, Some(ranges.as_path())] {
        let run = Stream {
            r3map,
            image: &movie,
            frontend: "file",
            ranges,
            work,
        };
        runs.push(run.run(|path| {
            let got = probe(Path::new(path))?;
            ensure!(
                got == expected,
                "ffprobe over the mount said {got:?}, the local file {expected:?}"
            );
            Ok(())
        })?);
    }
    Ok(runs)
}

/// What ffprobe finds in a file's index: codec, size, frame count and duration.
fn probe(path: &Path) -> Result<String> {
    let out = tool(
        "ffprobe",
        &[
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=codec_name,width,height,nb_frames,duration",
            "-of",
            "default=noprint_wrappers=1",
            path.to_str().context("path is not UTF-8")?,
        ],
    )?;
    Ok(out.trim().to_string())
}

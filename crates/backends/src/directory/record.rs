//! The layout record: the size and chunk size a chunk directory was first opened with, so that
//! reopening it with others (which would misplace every byte) fails instead.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use r3map_core::{ChunkLayout, Error, Result};

use crate::fileops::{setup_error, sync_dir};

const RECORD_FILE: &str = "r3map-layout";

/// Fails unless `dir`'s record matches `layout`; writes the record if there is none yet.
pub(super) fn check_or_write(dir: &Path, layout: ChunkLayout) -> Result<()> {
    let path = dir.join(RECORD_FILE);
    let expected = describe(layout);
    match fs::read_to_string(&path) {
        Ok(found) if found == expected => Ok(()),
        Ok(found) => Err(Error::InvalidConfig(format!(
            "{} holds chunks for `{}`, not `{}`; reopen it with the same size and chunk size, \
             or use another directory",
            dir.display(),
            found.trim(),
            expected.trim()
        ))),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            write(dir, &path, &expected).map_err(|err| setup_error(err, "cannot record the layout in", &path))
        }
        Err(err) => Err(setup_error(err, "cannot read", &path)),
    }
}

fn describe(layout: ChunkLayout) -> String {
    format!("size={} chunk_size={}\n", layout.size(), layout.chunk_size())
}

fn write(dir: &Path, path: &Path, record: &str) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.write_all(record.as_bytes())?;
    file.sync_all()?;
    sync_dir(dir)
}

//! Where the bytes a reader needs first sit: the SQLite pages a query walks (inside an ext4
//! image, mapped through the file's extents as `debugfs` reports them) and the index of an MP4.
//! Both print a `--pull-ranges` file: `OFFSET LENGTH # what`, most urgent first.

use std::ops::Range;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

/// A byte range of the image and why it is urgent.
pub struct Urgent {
    pub range: Range<u64>,
    pub what: String,
}

pub fn print(ranges: &[Urgent]) -> String {
    ranges
        .iter()
        .map(|u| format!("{} {} # {}\n", u.range.start, u.range.end - u.range.start, u.what))
        .collect()
}

/// Runs one debugfs request against an ext4 image (read-only; no mount, no root needed).
fn debugfs(image: &Path, request: &str) -> Result<String> {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .context("cannot run debugfs (e2fsprogs)")?;
    ensure!(
        out.status.success(),
        "debugfs -R {request:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A file's blocks inside an ext4 image: (first logical block, first physical block, count).
pub struct FileMap {
    pub block_size: u64,
    extents: Vec<(u64, u64, u64)>,
    /// Extent tree blocks (metadata needed to find the data).
    tree_blocks: Vec<u64>,
}

impl FileMap {
    pub fn of(image: &Path, path: &str) -> Result<Self> {
        let stats = debugfs(image, "stats")?;
        let block_size = stats
            .lines()
            .find_map(|l| l.strip_prefix("Block size:"))
            .context("debugfs stats shows no block size")?
            .trim()
            .parse()?;
        let stat = debugfs(image, &format!("stat {path}"))?;
        let Some((_, list)) = stat.split_once("EXTENTS:") else {
            bail!("debugfs shows no extents for {path} (not an extent-mapped file?)");
        };
        let (mut extents, mut tree_blocks) = (Vec::new(), Vec::new());
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            // (ETB0):24836 | (0):6441 | (3-4):6442-6443, optionally with [u] for unwritten.
            let entry = entry.replace("[u]", "");
            let (logical, physical) = entry
                .trim_start_matches('(')
                .split_once("):")
                .with_context(|| format!("unexpected extent {entry:?}"))?;
            let first = |s: &str| -> Result<u64> { Ok(s.split('-').next().unwrap_or(s).trim().parse()?) };
            if logical.starts_with("ETB") {
                tree_blocks.push(first(physical)?);
                continue;
            }
            let (start, end) = match logical.split_once('-') {
                Some((a, b)) => (a.parse::<u64>()?, b.parse::<u64>()?),
                None => (logical.parse()?, logical.parse()?),
            };
            extents.push((start, first(physical)?, end - start + 1));
        }
        Ok(Self {
            block_size,
            extents,
            tree_blocks,
        })
    }

    /// The image ranges holding `len` bytes of the file at `offset` (holes have none).
    pub fn map(&self, offset: u64, len: u64) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        let (bs, end) = (self.block_size, offset + len);
        let mut at = offset;
        while at < end {
            let (block, within) = (at / bs, at % bs);
            let piece = (bs - within).min(end - at);
            if let Some(&(l, p, _)) = self
                .extents
                .iter()
                .find(|&&(l, _, n)| block >= l && block < l + n)
            {
                let start = (p + block - l) * bs + within;
                match out.last_mut() {
                    Some(last) if last.end == start => last.end += piece,
                    _ => out.push(start..start + piece),
                }
            }
            at += piece;
        }
        out
    }
}

/// The block holding an inode's record (`debugfs imap`).
fn inode_block(image: &Path, path: &str, block_size: u64) -> Result<Range<u64>> {
    let imap = debugfs(image, &format!("imap {path}"))?;
    let block: u64 = imap
        .split("located at block ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .with_context(|| format!("debugfs imap {path}: {imap:?}"))?
        .trim()
        .parse()?;
    Ok(block * block_size..(block + 1) * block_size)
}

/// The urgent ranges of SQLite database `db` (a path inside ext4 `image`): the filesystem's
/// superblock and group descriptors, the inodes and directory leading to the file, then the
/// database header page and every interior b-tree page (table and index); a point query walks
/// these, and then needs only a leaf or two, fetched on demand.
pub fn sqlite(image: &Path, db: &str) -> Result<Vec<Urgent>> {
    let file = FileMap::of(image, db)?;
    let root = FileMap::of(image, "/")?;
    let bs = file.block_size;
    let mut urgent = vec![Urgent {
        range: 0..2 * bs.max(1024),
        what: "ext4 superblock and group descriptors".into(),
    }];
    for path in ["/", db] {
        urgent.push(Urgent {
            range: inode_block(image, path, bs)?,
            what: format!("inode of {path}"),
        });
    }
    for (l, p, n) in &root.extents {
        let _ = l;
        urgent.push(Urgent {
            range: p * bs..(p + n) * bs,
            what: "root directory".into(),
        });
    }
    for block in &file.tree_blocks {
        urgent.push(Urgent {
            range: block * bs..(block + 1) * bs,
            what: format!("extent tree of {db}"),
        });
    }
    let img = std::fs::File::open(image).with_context(|| format!("cannot open {}", image.display()))?;
    let read = |offset: u64, len: usize| -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let mut at = 0usize;
        for range in file.map(offset, len as u64) {
            let n = (range.end - range.start) as usize;
            std::os::unix::fs::FileExt::read_exact_at(&img, &mut buf[at..at + n], range.start)?;
            at += n;
        }
        Ok(buf) // a hole reads as zeros (only when it is the whole request)
    };
    let header = read(0, 100)?;
    ensure!(
        header.starts_with(b"SQLite format 3\0"),
        "{db} in {} is not a SQLite database",
        image.display()
    );
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65536,
        n => n as u64,
    };
    let pages = u32::from_be_bytes([header[28], header[29], header[30], header[31]]) as u64;
    let mut add_page = |page: u64, what: &str| {
        for range in file.map((page - 1) * page_size, page_size) {
            urgent.push(Urgent {
                range,
                what: format!("{what} (page {page})"),
            });
        }
    };
    add_page(1, "SQLite header and schema");
    let mut interior = 0;
    for page in 2..=pages {
        // The b-tree page type is the first byte (interior index 0x02, interior table 0x05).
        // An overflow or free page whose first byte happens to match is pulled early too:
        // harmless, only earlier.
        let kind = read((page - 1) * page_size, 1)?[0];
        if kind == 0x02 || kind == 0x05 {
            add_page(
                page,
                if kind == 0x02 {
                    "interior index page"
                } else {
                    "interior table page"
                },
            );
            interior += 1;
        }
    }
    eprintln!("{db}: {pages} pages of {page_size} bytes, {interior} interior b-tree pages first");
    Ok(urgent)
}

/// The urgent ranges of an MP4 (ISO BMFF) file: the `ftyp` box and the `moov` box (the index:
/// codecs, durations, where each sample sits) wherever it is, found by walking the top-level
/// box headers. Fails unless `moov` comes after `mdat` (the shape this example is about).
pub fn mp4(path: &Path) -> Result<Vec<Urgent>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = file.metadata()?.len();
    let (mut at, mut urgent, mut mdat_at) = (0u64, Vec::new(), None);
    while at + 8 <= size {
        let mut head = [0u8; 16];
        let n = (size - at).min(16) as usize;
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut head[..n], at)?;
        let kind = String::from_utf8_lossy(&head[4..8]).into_owned();
        let len = match u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as u64 {
            0 => size - at, // to the end of the file
            1 if n == 16 => u64::from_be_bytes(head[8..16].try_into()?),
            1 => bail!("truncated 64-bit box header at {at}"),
            len => len,
        };
        ensure!(
            len >= 8 && at + len <= size,
            "box {kind:?} at {at} has an impossible length {len}"
        );
        match kind.as_str() {
            "ftyp" | "moov" => urgent.push(Urgent {
                range: at..at + len,
                what: format!("{kind} box"),
            }),
            "mdat" => mdat_at = Some(at),
            _ => {}
        }
        at += len;
    }
    let moov_at = urgent
        .iter()
        .find(|u| u.what == "moov box")
        .map(|u| u.range.start);
    match (mdat_at, moov_at) {
        (Some(mdat), Some(moov)) if moov > mdat => Ok(urgent),
        (_, None) => bail!("{} has no moov box", path.display()),
        _ => bail!(
            "the moov box of {} is not after its mdat (made with +faststart?)",
            path.display()
        ),
    }
}

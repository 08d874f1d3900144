//! `--pull-ranges FILE`: byte ranges a managed mount pulls before the rest, in the order listed.
//!
//! One range a line, `OFFSET LENGTH` (bytes, or sizes such as `4KiB`); blank lines and text after
//! `#` are ignored. Tools that know a resource's layout write such a file (for example the
//! SQLite pages a query needs first: `cargo run -p r3map-cli --example usecases -- sqlite-ranges`).

use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Context, Result};
use r3map_mount::parse_size;

/// Reads a ranges file; refuses malformed lines and ranges past `size`, naming the line.
pub fn read(path: &Path, size: u64) -> Result<Vec<Range<u64>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the pull ranges file {}", path.display()))?;
    parse(&text, size).with_context(|| format!("in the pull ranges file {}", path.display()))
}

fn parse(text: &str, size: u64) -> Result<Vec<Range<u64>>> {
    let mut ranges = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [offset, length] = fields[..] else {
            bail!("line {}: {line:?} is not `OFFSET LENGTH`", number + 1);
        };
        let parse =
            |field: &str| parse_size(field).map_err(|err| anyhow::anyhow!("line {}: {err}", number + 1));
        let (offset, length) = (parse(offset)?, parse(length)?);
        match offset.checked_add(length) {
            Some(end) if end <= size => ranges.push(offset..end),
            _ => bail!(
                "line {}: {offset}+{length} ends past the resource's {size} bytes",
                number + 1
            ),
        }
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn ranges_in_file_order_with_sizes_and_comments() {
        let text = "# header first\n0 4096\n\n  1MiB 64KiB # an index page\n100 1\n";
        assert_eq!(
            parse(text, 2 << 20).unwrap(),
            vec![0..4096, (1 << 20)..(1 << 20) + (64 << 10), 100..101]
        );
    }

    #[test]
    fn malformed_lines_and_ranges_past_the_end_are_refused_by_line() {
        let err = |text: &str| parse(text, 4096).unwrap_err().to_string();
        assert!(err("0 10\n5\n").starts_with("line 2:"), "{}", err("0 10\n5\n"));
        assert!(err("0 10 20\n").starts_with("line 1:"));
        assert!(err("x 10\n").starts_with("line 1:"));
        assert!(err("4000 97\n").contains("past the resource"));
        assert!(err(&format!("{} 2\n", u64::MAX)).contains("past the resource"));
        assert!(parse("4000 96\n", 4096).is_ok());
    }
}

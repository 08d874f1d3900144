//! Reading a process's `/metrics` endpoint in tests: one HTTP GET and a parser of the
//! Prometheus text format that keeps each sample line as (name, labels, value).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// The endpoint a process printed ("metrics at http://ADDR/metrics"): `ADDR`.
pub fn metrics_addr(proc: &mut crate::common::Proc, timeout: Duration) -> String {
    let line = proc.wait_for_line("metrics at http://", timeout);
    let url = line.split_whitespace().last().unwrap();
    url.trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_string()
}

/// A sample: name, labels (key, value), value.
type Sample = (String, Vec<(String, String)>, f64);

/// One scrape.
#[derive(Debug)]
pub struct Scrape {
    samples: Vec<Sample>,
    pub text: String,
}

impl Scrape {
    /// GET http://ADDR/metrics.
    pub fn get(addr: &str) -> Self {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        Self::parse(body)
    }

    /// Sample lines are `NAME{K="V",…} VALUE` or `NAME VALUE`; comments start with `#`.
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {line:?}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let rest = rest
                        .strip_suffix('}')
                        .unwrap_or_else(|| panic!("bad labels in {line:?}"));
                    let labels = rest
                        .split(',')
                        .map(|pair| {
                            let (k, v) = pair
                                .split_once('=')
                                .unwrap_or_else(|| panic!("bad label in {line:?}"));
                            (k.to_string(), v.trim_matches('"').to_string())
                        })
                        .collect();
                    (name, labels)
                }
                None => (series, Vec::new()),
            };
            samples.push((name.to_string(), labels, value));
        }
        Self {
            samples,
            text: text.to_string(),
        }
    }

    /// The value of `name` with (at least) these labels, or `None` if no such sample exists.
    /// Panics if several samples match (ask with more labels).
    pub fn get_value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| *v)
            .collect();
        assert!(
            matching.len() <= 1,
            "{name} {labels:?} matches {} samples",
            matching.len()
        );
        matching.first().copied()
    }

    /// Like [`Scrape::get_value`], panicking (with the scrape) if the sample is missing.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get_value(name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in the scrape:\n{}", self.text))
    }
}

/// Scrapes `addr` until `done` holds (bounded by `timeout`); returns that scrape.
pub fn scrape_until(addr: &str, timeout: Duration, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + timeout;
    loop {
        let scrape = Scrape::get(addr);
        if done(&scrape) {
            return scrape;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {timeout:?}; last scrape:\n{}",
            scrape.text
        );
        // Polling an endpoint that has no push (the deadline above bounds it).
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_parser_reads_labelled_and_plain_samples() {
    let scrape = Scrape::parse(
        "# HELP x y\nr3map_a_total 5\nr3map_b{role=\"remote\",op=\"read\"} 1.5\nr3map_b{role=\"export\",op=\"read\"} 2\n# EOF\n",
    );
    assert_eq!(scrape.value("r3map_a_total", &[]), 5.0);
    assert_eq!(scrape.value("r3map_b", &[("role", "remote")]), 1.5);
    assert_eq!(
        scrape.value("r3map_b", &[("role", "export"), ("op", "read")]),
        2.0
    );
    assert_eq!(scrape.get_value("r3map_b", &[("role", "frontend")]), None);
}

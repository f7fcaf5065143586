//! Private Redis and PostgreSQL servers for the scale-out tests: each test
//! starts its own on a free loopback port in a temporary directory, so it can
//! stop and restart it (fault tests) without touching anything else.
//!
//! On a machine without the server binaries, `start` returns `None` and the
//! test says on stderr that it was skipped. With `TOLLGATE_REQUIRE_SERVICES=1`
//! (set by `.ci/run`) a missing binary is a failure instead.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to accept connections.
const READY_WITHIN: Duration = Duration::from_secs(30);

fn required() -> bool {
    std::env::var("TOLLGATE_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// `None` after saying the test is skipped, or a panic when services are required.
fn missing<T>(test: &str, what: &str) -> Option<T> {
    let message = format!(
        "{test}: {what} not found on this machine (install it, or see .ci/run); \
         set TOLLGATE_REQUIRE_SERVICES=1 to make this a failure"
    );
    assert!(!required(), "{message}");
    eprintln!("SKIPPED {message}");
    None
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn find_binary(name: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    dirs.iter()
        .chain(path_dirs.iter())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn signal(child: &Child, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + READY_WITHIN;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} did not become ready");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `redis-server` with no persistence on 127.0.0.1.
pub struct RedisServer {
    binary: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one, or `None` (skipped) when `redis-server` is not installed.
    pub fn start(test: &str) -> Option<RedisServer> {
        let Some(binary) = find_binary("redis-server", &[PathBuf::from("/usr/bin")]) else {
            return missing(test, "redis-server");
        };
        let mut server = RedisServer {
            binary,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        server.restart();
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (its data is lost, as after a crash without persistence).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port; returns once it answers PING.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new(&self.binary)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir.path().to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let port = self.port;
        wait_until("redis-server", || redis_ping(port));
    }

    /// One command over RESP, its raw reply (for assertions on the stored state).
    pub fn command(&self, args: &[&str]) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).unwrap();
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        // Replies used by the tests are small; read until a complete one arrived.
        loop {
            let n = stream.read(&mut buf).unwrap();
            reply.extend_from_slice(&buf[..n]);
            if n == 0 || resp_complete(&reply) {
                break;
            }
        }
        String::from_utf8_lossy(&reply).into_owned()
    }
}

/// True when `reply` holds one whole RESP value.
fn resp_complete(reply: &[u8]) -> bool {
    fn value(b: &[u8]) -> Option<usize> {
        let end = b.windows(2).position(|w| w == b"\r\n")?;
        let head = std::str::from_utf8(&b[1..end]).ok()?;
        let rest = end + 2;
        match b.first()? {
            b'+' | b'-' | b':' => Some(rest),
            b'$' => {
                let len: i64 = head.parse().ok()?;
                if len < 0 {
                    return Some(rest);
                }
                let total = rest + len as usize + 2;
                (b.len() >= total).then_some(total)
            }
            b'*' => {
                let count: i64 = head.parse().ok()?;
                let mut at = rest;
                for _ in 0..count.max(0) {
                    at += value(&b[at..])?;
                }
                Some(at)
            }
            _ => None,
        }
    }
    value(reply).is_some()
}

fn redis_ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(stream.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A PostgreSQL cluster of its own (`initdb` in a temporary directory), trust
/// authentication on 127.0.0.1, superuser `tollgate`, database `postgres`.
pub struct PostgresServer {
    bin: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    /// The uid/gid postgres runs as: it refuses to run as root.
    user: Option<(u32, u32)>,
    child: Option<Child>,
}

/// `/usr/lib/postgresql/<highest>/bin`, or `TOLLGATE_PG_BIN`, or `PATH`.
fn postgres_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("TOLLGATE_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).or_else(|| {
        find_binary("postgres", &[])?
            .parent()
            .map(Path::to_path_buf)
    })
}

/// The `postgres` account's uid and gid, when running as root.
fn postgres_account() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres") && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl PostgresServer {
    /// Starts one, or `None` (skipped) when PostgreSQL is not installed.
    pub fn start(test: &str) -> Option<PostgresServer> {
        let Some(bin) = postgres_bin_dir() else {
            return missing(test, "PostgreSQL (initdb, postgres)");
        };
        let user = if running_as_root() {
            let Some(account) = postgres_account() else {
                return missing(
                    test,
                    "the `postgres` user account (PostgreSQL refuses to run as root)",
                );
            };
            Some(account)
        } else {
            None
        };
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        if let Some((uid, gid)) = user {
            for path in [dir.path(), data.as_path()] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
            }
        }
        let mut server = PostgresServer {
            bin,
            port: free_port(),
            dir,
            user,
            child: None,
        };
        let status = server
            .command("initdb")
            .args(["-D", data.to_str().unwrap()])
            .args(["-U", "tollgate", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("initdb runs");
        assert!(status.success(), "initdb failed");
        server.restart();
        Some(server)
    }

    fn command(&self, name: &str) -> Command {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(self.bin.join(name));
        if let Some((uid, gid)) = self.user {
            command.uid(uid).gid(gid);
        }
        command.current_dir(self.dir.path());
        command
    }

    pub fn url(&self) -> String {
        format!("postgres://tollgate@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Fast shutdown (open connections are closed); the data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "-INT");
            let _ = child.wait();
        }
    }

    /// Starts it (again) on the same port and data; returns once it accepts
    /// connections.
    pub fn restart(&mut self) {
        self.stop();
        let data = self.dir.path().join("data");
        let child = self
            .command("postgres")
            .args(["-D", data.to_str().unwrap()])
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", &format!("unix_socket_directories={}", data.display())])
            .args(["-c", "fsync=off", "-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres starts");
        self.child = Some(child);
        let ready = self.bin.join("pg_isready");
        let port = self.port.to_string();
        wait_until("postgres", || {
            Command::new(&ready)
                .args(["-h", "127.0.0.1", "-p", &port, "-U", "tollgate", "-q"])
                .status()
                .is_ok_and(|s| s.success())
        });
    }

    /// Runs one SQL statement with `psql`, its unaligned output (for assertions).
    pub fn sql(&self, statement: &str) -> String {
        let output = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "tollgate", "-d", "postgres", "-At", "-c", statement])
            .output()
            .expect("psql runs");
        assert!(
            output.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn redis_server_starts_stops_and_restarts() {
    let Some(mut redis) = RedisServer::start("redis_server_starts_stops_and_restarts") else {
        return;
    };
    assert_eq!(redis.command(&["SET", "k", "v"]), "+OK\r\n");
    assert_eq!(redis.command(&["GET", "k"]), "$1\r\nv\r\n");
    redis.stop();
    assert!(!redis_ping(redis.port()));
    redis.restart();
    assert_eq!(redis.command(&["GET", "k"]), "$-1\r\n", "no persistence");
}

#[test]
fn postgres_server_keeps_data_across_restart() {
    let Some(mut pg) = PostgresServer::start("postgres_server_keeps_data_across_restart") else {
        return;
    };
    pg.sql("CREATE TABLE t (v BIGINT)");
    pg.sql("INSERT INTO t VALUES (42)");
    pg.stop();
    pg.restart();
    assert_eq!(pg.sql("SELECT v FROM t"), "42");
}

//! Test harness: real PostgreSQL 15 clusters, a real S3-compatible server (s3s-fs's store, in
//! `tools/s3-server`) and the Azure Blob emulator (Azurite), on loopback, in temporary
//! directories, stopped and removed when dropped.
//!
//! Postgres refuses to run as root, and tests usually run as root here: clusters then run as the
//! `postgres` user (`runuser -u postgres --`) in folders it owns, and the `pgkeep` binary is copied
//! into the test folder so that `archive_command`/`restore_command` (run as `postgres`) can reach it.
#![allow(dead_code)]

mod azurite;
mod proxy;
pub mod s3_faults;
#[allow(unused_imports)]
pub use azurite::AzuriteServer;
#[allow(unused_imports)]
pub use proxy::MagicProxy;

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where the Postgres 15 binaries are, server and client tools (override with PGKEEPTEST_PG_BIN).
/// The client tools (psql, pgbench, pg_verifybackup) serve every major.
pub fn pg_bin(program: &str) -> PathBuf {
    let dir =
        std::env::var("PGKEEPTEST_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    PathBuf::from(dir).join(program)
}

/// The major the suite runs on unless a test names one (PGKEEPTEST_PG_MAJOR; default 17).
pub fn default_major() -> u32 {
    std::env::var("PGKEEPTEST_PG_MAJOR")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(17)
}

/// The major of the client tools this machine has (Debian's): tests that compare pgkeep with
/// `pg_basebackup` or check its result with `pg_verifybackup` run their cluster on it.
pub const TOOLS_MAJOR: u32 = 15;

/// The server binaries (`initdb`, `postgres`, `pg_ctl`) of `major`: Debian's for 15, else those
/// `scripts/install-deps.sh majors` unpacked into PGKEEP_PG_CACHE (default /var/tmp/pgkeep-postgres).
pub fn server_bin_dir(major: u32) -> PathBuf {
    if major == 15 {
        return pg_bin("");
    }
    let cache =
        std::env::var("PGKEEP_PG_CACHE").unwrap_or_else(|_| "/var/tmp/pgkeep-postgres".into());
    let dir = PathBuf::from(cache)
        .join(major.to_string())
        .join("native/bin");
    assert!(
        dir.join("postgres").exists(),
        "Postgres {major} is not installed in {}: run scripts/install-deps.sh majors (scripts/test.sh does)",
        dir.display()
    );
    dir
}

pub fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// uid and gid of the `postgres` user.
pub fn postgres_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.first() == Some(&"postgres") && f.len() > 3 {
            return (f[2].parse().unwrap(), f[3].parse().unwrap());
        }
    }
    panic!("there is no postgres user on this machine; the Postgres server package creates it")
}

/// Gives `path` to the user Postgres runs as (a no-op when not root).
pub fn give_to_postgres(path: &Path) {
    if !is_root() {
        return;
    }
    let (uid, gid) = postgres_ids();
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "chown {}", path.display());
}

/// A command run as the `postgres` user when we are root, with exactly the extra environment given.
pub fn as_postgres(program: impl AsRef<std::ffi::OsStr>, env: &[(String, String)]) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "env"]);
        for (k, v) in env {
            c.arg(format!("{k}={v}"));
        }
        c.arg(program);
        c
    } else {
        let mut c = Command::new(program);
        c.envs(env.iter().map(|(k, v)| (k, v)));
        c
    }
}

/// Runs a command, panicking with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A loopback port nobody uses right now, for a server a test starts later.
///
/// Drawn from below the kernel's ephemeral range (32768-60999): a port from `bind(":0")` comes
/// from that range, where any outgoing connection of a parallel test (an S3 client, a libpq
/// session) may be holding it by the time the server binds, and Postgres then fails with
/// "could not bind ... Address already in use" (seen in CI). Ports are spread by process id and
/// a counter, so parallel test processes rarely try the same one, and each is checked free.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    for _ in 0..200 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + seed.wrapping_add(n.wrapping_mul(7_919)) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN);
}

/// Polls `check` until it returns Some, or panics after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A temporary folder under /tmp that the postgres user can use; removed on drop
/// (kept when PGKEEPTEST_KEEP is set, for debugging).
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    pub fn new(label: &str) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("pgkeep-{label}-"))
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        give_to_postgres(dir.path());
        let path = dir.path().to_path_buf();
        TestDir {
            dir: Some(dir),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A subfolder owned by the postgres user.
    pub fn mkdir(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).unwrap();
        give_to_postgres(&p);
        p
    }

    /// Copies the pgkeep binary under test here, where the postgres user can run it.
    pub fn install_pgkeep(&self) -> PathBuf {
        let dest = self.path.join("pgkeep");
        std::fs::copy(env!("CARGO_BIN_EXE_pgkeep"), &dest).unwrap();
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755)).unwrap();
        dest
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("PGKEEPTEST_KEEP").is_some()
            && let Some(d) = self.dir.take()
        {
            eprintln!("keeping {}", d.keep().display());
        }
    }
}

/// A real PostgreSQL cluster, stopped (immediately) on drop.
pub struct PgCluster {
    pub data: PathBuf,
    pub port: u16,
    sockdir: PathBuf,
    logfile: PathBuf,
    /// Extra environment for the postmaster (and so for archive_command/restore_command).
    env: Vec<(String, String)>,
    running: bool,
    /// The server binaries of this cluster's major.
    bin: PathBuf,
    pub major: u32,
}

impl PgCluster {
    /// `initdb` a new cluster of the default major in `root/name` with the given WAL segment size (MB).
    pub fn init(
        root: &Path,
        name: &str,
        wal_segsize_mb: u32,
        env: &[(String, String)],
    ) -> PgCluster {
        PgCluster::init_major(root, name, wal_segsize_mb, env, default_major())
    }

    /// `initdb` a new cluster of Postgres `major`.
    pub fn init_major(
        root: &Path,
        name: &str,
        wal_segsize_mb: u32,
        env: &[(String, String)],
        major: u32,
    ) -> PgCluster {
        let data = root.join(name);
        run_ok(
            as_postgres(server_bin_dir(major).join("initdb"), &[])
                .arg("-D")
                .arg(&data)
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ])
                .arg(format!("--wal-segsize={wal_segsize_mb}")),
        );
        PgCluster::adopt(root, data, env)
    }

    /// Takes over an existing data directory (a base backup or a restore), giving it a fresh port.
    pub fn adopt(root: &Path, data: PathBuf, env: &[(String, String)]) -> PgCluster {
        give_to_postgres(&data);
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        let name = data.file_name().unwrap().to_string_lossy().into_owned();
        let major: u32 = std::fs::read_to_string(data.join("PG_VERSION"))
            .expect("a data directory has PG_VERSION")
            .trim()
            .parse()
            .unwrap();
        let sockdir = root.join(format!("{name}.sock"));
        std::fs::create_dir_all(&sockdir).unwrap();
        give_to_postgres(&sockdir);
        let cluster = PgCluster {
            port: free_port(),
            logfile: root.join(format!("{name}.log")),
            sockdir,
            data,
            env: env.to_vec(),
            running: false,
            bin: server_bin_dir(major),
            major,
        };
        cluster.set(&[
            ("port", &cluster.port.to_string()),
            ("listen_addresses", "'127.0.0.1'"),
            (
                "unix_socket_directories",
                &format!("'{}'", cluster.sockdir.display()),
            ),
            ("fsync", "off"),
            ("log_line_prefix", "'%m [%p] '"),
        ]);
        cluster
    }

    /// Appends settings to postgresql.conf (later lines win).
    pub fn set(&self, settings: &[(&str, &str)]) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))
            .unwrap();
        for (k, v) in settings {
            writeln!(f, "{k} = {v}").unwrap();
        }
    }

    /// Starts the server. The port was free when it was picked, but parallel tests pick ports too:
    /// if another process took it meanwhile, a new one is picked and the start retried.
    pub fn start(&mut self) {
        for attempt in 0..4 {
            let log_before = self.log().len();
            let ok = as_postgres(self.bin.join("pg_ctl"), &self.env)
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(&self.logfile)
                .args(["-w", "-t", "120", "start"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap()
                .success();
            self.running = true;
            if ok {
                return;
            }
            let log = self.log();
            let new = &log[log_before.min(log.len())..];
            if attempt < 3 && new.contains("could not bind") {
                self.port = free_port();
                self.set(&[("port", &self.port.to_string())]);
                continue;
            }
            panic!("pg_ctl start failed; server log:\n{log}");
        }
    }

    /// kill -9 of the postmaster, as a crash would; its children notice and exit on their own.
    pub fn kill9(&mut self) {
        let pid = std::fs::read_to_string(self.data.join("postmaster.pid")).unwrap();
        let pid = pid.lines().next().unwrap().trim().to_string();
        run_ok(Command::new("kill").args(["-KILL", &pid]));
        self.running = false;
        // The children notice the postmaster's death within moments (their process titles do not
        // say which cluster they belong to, so there is nothing precise to wait for).
        std::thread::sleep(Duration::from_secs(1));
    }

    /// Stops with the given mode (`fast`, `immediate`, `smart`).
    pub fn stop(&mut self, mode: &str) {
        if !self.running {
            return;
        }
        let out = as_postgres(self.bin.join("pg_ctl"), &[])
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "120", "-m", mode, "stop"])
            .output()
            .unwrap();
        self.running = false;
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs SQL through psql (over TCP, as the superuser); returns trimmed unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        let out = self.try_psql(sql);
        assert!(
            out.status.success(),
            "psql failed on {sql:?}: {}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn try_psql(&self, sql: &str) -> Output {
        self.psql_command()
            .args(["-A", "-t", "-c", sql])
            .output()
            .unwrap()
    }

    /// psql to this cluster over TCP as the superuser, stopping at the first error.
    fn psql_command(&self) -> Command {
        let mut c = Command::new("psql");
        c.args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
        ])
        .args(["-p", &self.port.to_string(), "-d", "postgres"])
        .env("PGCONNECT_TIMEOUT", "10");
        c
    }

    /// Runs a script through psql's standard input: each statement its own transaction (unless
    /// the script says otherwise), all of them done and acknowledged when this returns.
    pub fn psql_script(&self, script: &str) {
        use std::io::Write;
        let mut child = self
            .psql_command()
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "psql script failed");
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.logfile).unwrap_or_default()
    }

    /// Switches to a new WAL segment and waits until the segment it closed is archived.
    /// Returns that segment's name.
    pub fn switch_and_wait_archived(&self) -> String {
        // Some WAL first: without any since the last switch, pg_switch_wal() switches nothing
        // and names the (empty) segment in use, which then never completes (seen on 17 and 18).
        self.psql("select pg_logical_emit_message(false, 'pgkeep-test', 'switch')");
        let seg = self.psql("select pg_walfile_name(pg_switch_wal())");
        self.wait_archived(&seg);
        seg
    }

    /// Waits until the archiver has archived `segment` (or a later one).
    pub fn wait_archived(&self, segment: &str) {
        wait_for(
            &format!("{segment} to be archived"),
            Duration::from_secs(120),
            || {
                let last =
                    self.psql("select coalesce(last_archived_wal, '') from pg_stat_archiver");
                // Names of one timeline sort in WAL order.
                (last.len() >= 24 && last[..24] >= *segment).then_some(())
            },
        );
    }

    /// libpq variables that point a client (pgkeep, pgbench) at this cluster.
    pub fn client_env(&self) -> Vec<(String, String)> {
        vec![
            ("PGHOST".into(), "127.0.0.1".into()),
            ("PGPORT".into(), self.port.to_string()),
            ("PGUSER".into(), "postgres".into()),
        ]
    }

    /// Runs pgbench against this cluster.
    pub fn pgbench(&self, args: &[&str]) -> Command {
        let mut c = Command::new(pg_bin("pgbench"));
        c.args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-p",
            &self.port.to_string(),
        ])
        .args(args)
        .arg("postgres")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        c
    }

    /// Waits until the server has left recovery (promoted).
    pub fn wait_promoted(&self) {
        wait_for(
            "the server to finish recovery",
            Duration::from_secs(180),
            || {
                let out = self.try_psql("select pg_is_in_recovery()");
                (out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "f")
                    .then_some(())
            },
        );
    }

    /// The row count and an order-independent checksum of every row of `table` (a sum of 60-bit
    /// prefixes of each row's md5: cheap on a million rows, and any changed row changes it).
    pub fn table_checksum(&self, table: &str) -> String {
        self.psql(&format!(
            "select count(*) || ' ' || coalesce(sum(('x' || substr(md5(x::text), 1, 15))::bit(60)::bigint), 0) from {table} x"
        ))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            let _ = as_postgres(self.bin.join("pg_ctl"), &[])
                .arg("-D")
                .arg(&self.data)
                .args(["-w", "-t", "60", "-m", "immediate", "stop"])
                .output();
        }
    }
}

/// The S3 test server (`tools/s3-server`: s3s-fs's store, served with TCP_NODELAY): on PATH, in
/// ~/.cargo/bin, or PGKEEPTEST_S3S_FS. `scripts/test.sh` installs it.
fn s3s_fs_binary() -> PathBuf {
    if let Ok(p) = std::env::var("PGKEEPTEST_S3S_FS") {
        return PathBuf::from(p);
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("pgkeep-s3-test-server"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/pgkeep-s3-test-server"));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .expect("pgkeep-s3-test-server is not installed: run scripts/test.sh, or scripts/install-deps.sh s3s-fs, which installs it (tools/s3-server)")
}

/// s3s-fs on `port`, once it accepts connections; None if it exited (the port was taken).
fn spawn_s3s_fs(port: u16, dir: &Path, access_key: &str, secret_key: &str) -> Option<Child> {
    let mut child = Command::new(s3s_fs_binary())
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", access_key, "--secret-key", secret_key])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the S3 test server");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = child.try_wait() {
            return None;
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(child);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A real S3-compatible server (s3s-fs, which checks request signatures) on loopback with one bucket.
pub struct S3Server {
    child: Child,
    pub port: u16,
    /// The folder s3s-fs serves; bucket `b` is the folder `dir/b`.
    pub dir: PathBuf,
    pub bucket: String,
    access_key: String,
    secret_key: String,
}

impl S3Server {
    pub fn start(root: &Path) -> S3Server {
        let dir = root.join("s3");
        let bucket = "pgkeep-test".to_string();
        std::fs::create_dir_all(dir.join(&bucket)).unwrap();
        let (access_key, secret_key) = (
            "pgkeeptest".to_string(),
            "pgkeep-test-secret-key".to_string(),
        );
        for _ in 0..5 {
            let port = free_port();
            if let Some(child) = spawn_s3s_fs(port, &dir, &access_key, &secret_key) {
                return S3Server {
                    child,
                    port,
                    dir,
                    bucket,
                    access_key,
                    secret_key,
                };
            }
        }
        panic!("s3s-fs did not start");
    }

    /// Stops the server (an outage: connections are refused); `resume` starts it again.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on its port, with what it stored.
    pub fn resume(&mut self) {
        for _ in 0..50 {
            if let Some(child) =
                spawn_s3s_fs(self.port, &self.dir, &self.access_key, &self.secret_key)
            {
                self.child = child;
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("s3s-fs did not start again on port {}", self.port);
    }

    /// The standard AWS variables object_store reads.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which storage backend a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    File,
    S3,
}

/// A storage location for one test, with the config file and environment pgkeep needs to use it.
pub struct Storage {
    pub backend: Backend,
    pub url: String,
    /// Environment for pgkeep (credentials, endpoint).
    pub env: Vec<(String, String)>,
    /// The config file naming this storage.
    pub config: PathBuf,
    /// Where the objects land on this machine's disk (both backends are file-backed here).
    pub objects_dir: PathBuf,
    pub s3: Option<S3Server>,
}

impl Storage {
    pub fn new(backend: Backend, dir: &TestDir) -> Storage {
        let (url, env, objects_dir, s3) = match backend {
            Backend::File => {
                let root = dir.mkdir("archive");
                (format!("file://{}", root.display()), vec![], root, None)
            }
            Backend::S3 => {
                let s3 = S3Server::start(dir.path());
                let prefix = "prod/db1";
                let url = format!("s3://{}/{prefix}", s3.bucket);
                let objects = s3.dir.join(&s3.bucket).join(prefix);
                (url, s3.env(), objects, Some(s3))
            }
        };
        let config = dir.path().join("pgkeep.toml");
        // The daemon's token where its clients (wal-fetch, wal-switch, as the postgres user) find
        // it, as the chart puts it in a folder the pod's containers share.
        let token = dir.mkdir("http").join("token");
        std::fs::write(
            &config,
            format!(
                "storage = \"{url}\"\nhttp_token_file = \"{}\"\n",
                token.display()
            ),
        )
        .unwrap();
        Storage {
            backend,
            url,
            env,
            config,
            objects_dir,
            s3,
        }
    }

    /// The file on disk that holds the object `key` (relative to the storage URL).
    pub fn object_file(&self, key: &str) -> PathBuf {
        self.objects_dir.join(key)
    }

    /// Runs `bin --config <config> args...` as the current user with this storage's environment.
    pub fn pgkeep(&self, bin: &Path, args: &[&str]) -> Output {
        self.pgkeep_in(bin, args, None, &[])
    }

    /// Runs `bin --config <config> args...` as the postgres user (as an init container or sidecar
    /// would run), with this storage's environment and `extra`.
    pub fn pgkeep_pg(&self, bin: &Path, args: &[&str], extra: &[(String, String)]) -> Output {
        let mut env = self.env.clone();
        env.extend(extra.iter().cloned());
        as_postgres(bin, &env)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .current_dir("/")
            .output()
            .unwrap()
    }

    /// As [`Storage::pgkeep`], in `cwd` and with extra environment.
    pub fn pgkeep_in(
        &self,
        bin: &Path,
        args: &[&str],
        cwd: Option<&Path>,
        extra: &[(&str, &str)],
    ) -> Output {
        let mut c = Command::new(bin);
        c.arg("--config").arg(&self.config).args(args);
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        c.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c.envs(extra.iter().copied());
        if let Some(d) = cwd {
            c.current_dir(d);
        }
        c.output().unwrap()
    }
}

/// Reads every stored WAL segment back with `wal-fetch` (as the current user, with `env` for the
/// storage) and checks it is byte-equal to Postgres' own file in `pg_wal` (where that still
/// exists); returns how many were compared.
pub fn assert_stored_segments_equal(
    storage: &Storage,
    env: &[(String, String)],
    bin: &Path,
    pg: &PgCluster,
) -> usize {
    let fetched = storage.config.with_file_name("segment-compared");
    let mut compared = 0;
    for key in stored_keys(storage) {
        let name = key.rsplit('/').next().unwrap();
        if name.len() != 24 || !key.contains("/wal/") {
            continue;
        }
        let out = Command::new(bin)
            .arg("--config")
            .arg(&storage.config)
            .args(["wal-fetch", name, fetched.to_str().unwrap()])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let ours = pg.data.join("pg_wal").join(name);
        if ours.exists() {
            assert!(
                std::fs::read(&fetched).unwrap() == std::fs::read(&ours).unwrap(),
                "{name} differs from Postgres' own"
            );
            compared += 1;
        }
    }
    compared
}

/// Lists the object keys (relative to the storage URL) of files under the objects folder.
pub fn stored_keys(storage: &Storage) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = vec![];
    walk(&storage.objects_dir, &storage.objects_dir, &mut out);
    out.sort();
    out
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An HTTP request to the daemon on loopback, through pgkeep's own client: (status code, body).
pub fn http(method: &str, port: u16, path: &str) -> (u16, Vec<u8>) {
    http_with(method, port, path, &[])
}

/// [`http`] with request headers.
pub fn http_with(method: &str, port: u16, path: &str, headers: &[(&str, &str)]) -> (u16, Vec<u8>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let r = rt
        .block_on(pgkeep::http_client::request(
            addr,
            method,
            path,
            Duration::from_secs(30),
            1 << 30,
            headers,
        ))
        .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
    (r.status, r.body)
}

/// `pgkeep daemon` running as the postgres user; killed on drop.
pub struct Daemon {
    child: Child,
    /// Run under a wrapper (the pgkeep process is the wrapper's child).
    wrapped: bool,
    pub port: u16,
    log: PathBuf,
    /// The daemon's token file (`http_token_file` in the storage's config).
    pub token: PathBuf,
}

impl Daemon {
    pub fn start(
        dir: &TestDir,
        storage: &Storage,
        bin: &Path,
        pg: &PgCluster,
        extra: &[(&str, &str)],
    ) -> Daemon {
        Daemon::start_under(dir, storage, bin, pg, extra, &[])
    }

    /// As [`Daemon::start`], with the daemon run by `wrapper` (for example `strace -f -o LOG`):
    /// `wrapper[0]` runs as the postgres user with the rest of `wrapper`, then the daemon's
    /// command line, as its arguments.
    pub fn start_under(
        dir: &TestDir,
        storage: &Storage,
        bin: &Path,
        pg: &PgCluster,
        extra: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Daemon {
        let port = free_port();
        let spool = dir.mkdir(&format!("spool-{port}"));
        let mut env = storage.env.clone();
        env.extend(pg.client_env());
        env.push(("PGKEEP_LISTEN".into(), format!("127.0.0.1:{port}")));
        env.push(("PGKEEP_SPOOL_DIR".into(), spool.display().to_string()));
        // No scheduled backups unless a test asks for them (later settings win).
        env.push(("PGKEEP_BACKUP_INTERVAL_HOURS".into(), "0".into()));
        // Nor scheduled verifies.
        env.push(("PGKEEP_VERIFY_INTERVAL_HOURS".into(), "0".into()));
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let log_path = dir.path().join(format!("daemon-{port}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = as_postgres(program, &env);
                c.args(args).arg(bin);
                c
            }
            None => as_postgres(bin, &env),
        };
        let child = cmd
            .arg("--config")
            .arg(&storage.config)
            .arg("daemon")
            .current_dir("/")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child,
            wrapped: !wrapper.is_empty(),
            port,
            log: log_path,
            token: storage.config.with_file_name("http").join("token"),
        };
        let start = Instant::now();
        loop {
            if let Some(status) = d.child.try_wait().unwrap() {
                panic!(
                    "the daemon exited ({status}) before it was ready:\n{}",
                    d.log()
                );
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok()
                && http("GET", port, "/readyz").0 == 200
            {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the daemon was not ready after 30s:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    /// The `Authorization` header value that opens the daemon's `POST` routes (its token, from
    /// the file it wrote at start).
    pub fn bearer(&self) -> String {
        format!(
            "Bearer {}",
            std::fs::read_to_string(&self.token).unwrap().trim()
        )
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /backups` as JSON (null while storage holds no archive yet: it answers 502 then).
    pub fn backups(&self) -> serde_json::Value {
        serde_json::from_slice(&http("GET", self.port, "/backups").1).unwrap_or_default()
    }

    /// Waits (at most 90 s) until `GET /backups` lists `n` backups; returns that listing.
    pub fn wait_backups(&self, n: usize) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let listed = self.backups();
            if listed["backups"].as_array().map(|b| b.len()) == Some(n) {
                return listed;
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "not {n} backup(s) after 90 s; the daemon logged:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The daemon's /status as JSON text fields.
    pub fn status(&self) -> String {
        String::from_utf8_lossy(&http("GET", self.port, "/status").1).into_owned()
    }

    /// The durable LSN the daemon reports, as a number.
    pub fn durable(&self) -> u64 {
        let s = self.status();
        let lsn = s
            .split("\"durable_lsn\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect("durable_lsn");
        parse_lsn(lsn)
    }

    /// The pgkeep process's pid (below runuser when root, and below the wrapper if any).
    pub fn pid(&self) -> String {
        self.pgkeep_pid().expect("the daemon's process is running")
    }

    fn pgkeep_pid(&self) -> Option<String> {
        let mut pid = self.child.id().to_string();
        for _ in 0..(usize::from(is_root()) + usize::from(self.wrapped)) {
            let out = Command::new("pgrep").args(["-P", &pid]).output().ok()?;
            pid = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if pid.is_empty() {
                return None;
            }
        }
        Some(pid)
    }

    /// Sends a signal to the pgkeep process (not to runuser around it).
    pub fn signal(&self, sig: &str) {
        run_ok(Command::new("kill").args([&format!("-{sig}"), &self.pid()]));
    }

    /// `pgkeep wal-switch` (the preStop hook) against this daemon for `pg`; asserts it succeeded,
    /// that is: the switched WAL is durable in storage.
    pub fn wal_switch(&self, storage: &Storage, bin: &Path, pg: &PgCluster) {
        let mut env = storage.env.clone();
        env.extend(pg.client_env());
        env.push(("PGKEEP_LISTEN".into(), format!("127.0.0.1:{}", self.port)));
        let out = storage.pgkeep_pg(bin, &["wal-switch", "--timeout", "60"], &env);
        assert!(
            out.status.success(),
            "wal-switch (Postgres {}): {}",
            pg.major,
            stderr(&out)
        );
    }

    /// Waits for the daemon to exit; its exit status.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        wait_for("the daemon to exit", timeout, || {
            self.child.try_wait().unwrap()
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.signal_quiet("KILL");
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Daemon {
    fn signal_quiet(&self, sig: &str) -> Option<()> {
        let pid = self.pgkeep_pid()?;
        Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .ok()?;
        Some(())
    }
}

/// An LSN `X/Y` as a number (pgkeep's own parser).
pub fn parse_lsn(s: &str) -> u64 {
    s.trim().parse::<pgkeep::pg::Lsn>().expect("an LSN").0
}

/// `pg_verifybackup` on a restored data directory, as far as Postgres 15's can check it: every
/// file and, on 15, the WAL; on 13, 14 and 16 the files only (it cannot parse their WAL); 17 and
/// later write a manifest version it cannot read, and are not checked.
pub fn verify_restored(dir: &Path) {
    let major: u32 = std::fs::read_to_string(dir.join("PG_VERSION"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut cmd = Command::new(pg_bin("pg_verifybackup"));
    match major {
        15 => {}
        13 | 14 | 16 => {
            cmd.arg("--no-parse-wal");
        }
        _ => return,
    }
    run_ok(cmd.arg(dir));
}

/// `archive_command` running the copied pgkeep with this storage's config.
pub fn archive_command(bin: &Path, storage: &Storage) -> String {
    format!(
        "'{} --config {} archive-push %p'",
        bin.display(),
        storage.config.display()
    )
}

/// A new cluster (not started) that archives its WAL through `pgkeep archive-push`.
pub fn archiving_cluster(
    dir: &TestDir,
    storage: &Storage,
    bin: &Path,
    name: &str,
    wal_segsize_mb: u32,
) -> PgCluster {
    archiving_cluster_major(dir, storage, bin, name, wal_segsize_mb, default_major())
}

/// As [`archiving_cluster`], of Postgres `major`.
pub fn archiving_cluster_major(
    dir: &TestDir,
    storage: &Storage,
    bin: &Path,
    name: &str,
    wal_segsize_mb: u32,
    major: u32,
) -> PgCluster {
    let pg = PgCluster::init_major(dir.path(), name, wal_segsize_mb, &storage.env, major);
    pg.set(&[
        ("archive_mode", "on"),
        ("archive_command", &archive_command(bin, storage)),
    ]);
    pg
}

/// Starts a restored data directory with archiving off (a copy must not archive into the
/// original's storage) and waits until it has recovered and been promoted.
pub fn start_restored(dir: &TestDir, storage: &Storage, data: PathBuf) -> PgCluster {
    let mut c = PgCluster::adopt(dir.path(), data, &storage.env);
    c.set(&[("archive_mode", "off")]);
    c.start();
    c.wait_promoted();
    c
}

/// `pgkeep keygen -o FILE`: the recipient it printed, and the file (readable by postgres).
pub fn keygen(bin: &Path, dir: &TestDir, name: &str) -> (String, PathBuf) {
    let path = dir.path().join(name);
    let out = Command::new(bin)
        .args(["keygen", "-o"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "keygen: {}", stderr(&out));
    let recipient = stderr(&out)
        .trim()
        .strip_prefix("Public key: ")
        .expect("keygen prints the public key")
        .to_string();
    give_to_postgres(&path);
    (recipient, path)
}

//! A PgBouncer in transaction mode in front of the shared server, started
//! for one test from Debian's `pgbouncer` package and stopped with the value.
//! It has fewer server connections than cairn opens client connections, so
//! clients really do share them between transactions.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::ChildGuard;
use super::cluster::{free_port, running_as_root};

pub struct Bouncer {
    _process: ChildGuard,
    dir: PathBuf,
    pub port: u16,
}

impl Bouncer {
    /// Starts PgBouncer on a free port with `server_connections` server
    /// connections per database and user.
    pub fn start(server_connections: u32) -> Bouncer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("cairn-bouncer-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        let ini = format!(
            "[databases]\n* = host=127.0.0.1 port=5432\n\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {users}\npool_mode = transaction\n\
             default_pool_size = {server_connections}\nmax_client_conn = 500\n\
             ignore_startup_parameters = extra_float_digits\n",
            users = dir.join("users.txt").display(),
        );
        let config = dir.join("pgbouncer.ini");
        std::fs::write(&config, ini).unwrap();
        let mut cmd = Command::new(binary());
        if running_as_root() {
            // PgBouncer refuses to run as root.
            let status = Command::new("chmod")
                .arg("-R")
                .arg("a+rX")
                .arg(&dir)
                .status();
            assert!(status.is_ok_and(|s| s.success()));
            cmd.args(["-u", "postgres"]);
        }
        let log = std::fs::File::create(dir.join("pgbouncer.log")).unwrap();
        cmd.arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let process = ChildGuard(
            cmd.spawn()
                .expect("start pgbouncer (apt-get install pgbouncer)"),
        );
        let bouncer = Bouncer {
            _process: process,
            dir,
            port,
        };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "pgbouncer did not listen: {}",
                bouncer.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        bouncer
    }

    /// The URL of `database` through the pooler.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn binary() -> PathBuf {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("pgbouncer"))
}

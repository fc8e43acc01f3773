//! The floor: nginx as a plain HTTP reverse proxy in front of the same fake
//! upstream. It does none of a gateway's work (no JSON read, no key
//! checked, no model routed, no usage counted): what it adds is what a
//! second HTTP hop costs on this machine, the least any proxy can add.
//! HTTP/1.1 kept alive to the upstream with up to 32 idle connections per
//! worker, no access log, a worker process per CPU it is given (as berth
//! has a tokio worker per CPU).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Where Debian's `nginx` package puts the binary.
pub const NGINX: &str = "/usr/sbin/nginx";

/// Writes the config of an nginx serving on `port` into `dir` (its files go
/// there too) and returns the arguments that start it; an error that says
/// how to install nginx when it is missing.
pub fn args(
    dir: &Path,
    port: u16,
    upstream: SocketAddr,
    workers: usize,
) -> Result<Vec<PathBuf>, String> {
    if !Path::new(NGINX).exists() {
        return Err(format!(
            "{NGINX} is not installed: the floor is measured with it (apt-get install --no-install-recommends nginx), or set BENCH_FLOOR=0 to leave it out"
        ));
    }
    let dir = dir.join("nginx");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let d = dir.display();
    // keepalive_requests: nginx closes a kept-alive connection after 1,000
    // requests by default, on both sides; berth never does.
    let config = format!(
        "daemon off;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  upstream fake {{
    server {upstream};
    keepalive 32;
    keepalive_requests 1000000000;
  }}
  server {{
    listen 127.0.0.1:{port};
    keepalive_requests 1000000000;
    keepalive_timeout 10s;
    location = /health/liveliness {{ return 200 ok; }}
    location / {{
      proxy_pass http://fake;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
    }}
  }}
}}
"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, config).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(vec!["-c".into(), path, "-e".into(), dir.join("error.log")])
}

//! slurmrestd's REST API (OpenAPI v0.0.38) over HTTP/1.1 on TCP or a unix
//! socket, one connection per request (slurmrestd is local to the login
//! node, and a request is rare next to what a job costs). Every request
//! carries the user's JWT (`X-SLURM-USER-NAME`/`X-SLURM-USER-TOKEN`), read
//! anew each time from `slurm.token_file` when set, so a renewed token is
//! taken up without a restart. The API version is checked once, at the
//! first request that reaches slurmrestd.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::OnceCell;

use super::error::{API_VERSION, SlurmError};
use crate::config::SlurmConfig;

/// Largest answer read: the job list of a busy cluster is the big one.
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// Where slurmrestd listens.
#[derive(Debug, Clone)]
enum Address {
    Tcp { authority: String },
    Unix(PathBuf),
}

pub struct RestClient {
    url: String,
    address: Address,
    user: String,
    token: String,
    token_file: PathBuf,
    timeout: Duration,
    version_checked: OnceCell<()>,
    /// Why the last request got no answer from slurmrestd; None once one
    /// does (see [`RestClient::unreachable`]).
    unreachable: std::sync::Mutex<Option<String>>,
}

/// slurmrestd's answer: its HTTP status and JSON body.
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
}

impl Answer {
    /// SLURM's errors in the body (`errors[]`), as `(number, text)`.
    pub fn errors(&self) -> Vec<(i64, String)> {
        self.body["errors"]
            .as_array()
            .map(|errors| {
                errors
                    .iter()
                    .map(|e| {
                        let number = e["error_code"]
                            .as_i64()
                            .or_else(|| e["error_number"].as_i64())
                            .unwrap_or(-1);
                        let text = [&e["error"], &e["description"]]
                            .iter()
                            .filter_map(|v| v.as_str())
                            .filter(|s| !s.is_empty())
                            .collect::<Vec<_>>()
                            .join(": ");
                        (number, text)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// All of SLURM's error texts in one line, with their numbers.
    pub fn error_text(&self) -> String {
        let errors = self.errors();
        if errors.is_empty() {
            return format!("HTTP {}", self.status);
        }
        errors
            .iter()
            .map(|(number, text)| format!("{text} (error {number})"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub fn ok(&self) -> bool {
        self.status.is_success() && self.errors().is_empty()
    }
}

impl RestClient {
    /// The client for `config.rest_url` (not `off`), or why it is unusable.
    pub fn new(config: &SlurmConfig) -> Result<Self, String> {
        let url = config.rest_url.trim_end_matches('/').to_string();
        let address = if let Some(path) = url.strip_prefix("unix://") {
            Address::Unix(PathBuf::from(path))
        } else if let Some(authority) = url.strip_prefix("http://") {
            if authority.is_empty() || authority.contains('/') {
                return Err(format!(
                    "slurm.rest_url = \"{url}\": http://host:port with no path"
                ));
            }
            Address::Tcp {
                authority: authority.to_string(),
            }
        } else {
            return Err(format!(
                "slurm.rest_url = \"{url}\": http://host:port or unix:///path (slurmrestd speaks no TLS itself), or \"off\""
            ));
        };
        let user = if config.user.is_empty() {
            nix::unistd::User::from_uid(nix::unistd::geteuid())
                .ok()
                .flatten()
                .map(|u| u.name)
                .ok_or("slurm.user is empty and the agent's own user has no name")?
        } else {
            config.user.clone()
        };
        if config.token.is_empty() && config.token_file.as_os_str().is_empty() {
            return Err("slurm.token or slurm.token_file: slurmrestd needs the user's JWT (`scontrol token`)".into());
        }
        Ok(Self {
            url,
            address,
            user,
            token: config.token.clone(),
            token_file: config.token_file.clone(),
            timeout: config.request_timeout,
            version_checked: OnceCell::new(),
            unreachable: std::sync::Mutex::new(None),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Why slurmrestd did not answer the last request (it is down, or
    /// hangs), naming its URL; None when it answered, whatever it said.
    pub fn unreachable(&self) -> Option<String> {
        self.unreachable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// slurmrestd's ping: whether slurmctld answers it, for this token.
    pub async fn ping(&self) -> Result<Answer, SlurmError> {
        self.request(Method::GET, &format!("/slurm/{API_VERSION}/ping"), None)
            .await
    }

    /// A request to `/slurm/v0.0.38/<path>`, after the version check; an
    /// answer SLURM's errors make unusable is still returned (the caller
    /// knows what they mean), except one that says the token was refused.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, SlurmError> {
        self.version_checked
            .get_or_try_init(|| self.check_version())
            .await?;
        let answer = self
            .request(method, &format!("/slurm/{API_VERSION}/{path}"), body)
            .await?;
        // slurmctld answers a token it refuses with a bare "Unspecified
        // error" (error -1) on whatever was asked, which a ping tells apart
        // from a real failure of the request.
        if answer.status == StatusCode::UNAUTHORIZED
            || (!answer.ok() && answer.errors().iter().any(|(n, _)| *n == -1))
        {
            let ping = self.ping().await?;
            if !ping.ok() {
                return Err(self.rejected(&ping));
            }
        }
        Ok(answer)
    }

    /// The served API must be v0.0.38: its ping answers, and says it is.
    async fn check_version(&self) -> Result<(), SlurmError> {
        let ping = self.ping().await?;
        if ping.status == StatusCode::NOT_FOUND {
            let served = self.served_versions().await;
            return Err(SlurmError::UnsupportedVersion {
                url: self.url.clone(),
                served,
            });
        }
        if !ping.ok() {
            return Err(self.rejected(&ping));
        }
        let plugin = ping.body["meta"]["plugin"]["type"].as_str().unwrap_or("");
        if plugin != format!("openapi/{API_VERSION}") {
            return Err(SlurmError::UnsupportedVersion {
                url: self.url.clone(),
                served: format!("a ping answered by plugin `{plugin}`"),
            });
        }
        Ok(())
    }

    /// The `/slurm/vX/` versions slurmrestd's OpenAPI document lists.
    async fn served_versions(&self) -> String {
        let Ok(document) = self.request(Method::GET, "/openapi/v3", None).await else {
            return "(its /openapi/v3 does not answer)".into();
        };
        let mut versions: Vec<String> = document.body["paths"]
            .as_object()
            .map(|paths| {
                paths
                    .keys()
                    .filter_map(|path| path.strip_prefix("/slurm/")?.split('/').next())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        versions.sort();
        versions.dedup();
        if versions.is_empty() {
            "no /slurm/ API".into()
        } else {
            versions.join(", ")
        }
    }

    fn rejected(&self, answer: &Answer) -> SlurmError {
        SlurmError::TokenRejected {
            url: self.url.clone(),
            user: self.user.clone(),
            detail: format!(
                "{} (slurmctld refuses a token signed with another key, for another user, or expired)",
                answer.error_text()
            ),
        }
    }

    /// The token to send: from the file when one is set; refused here when
    /// it is not a JWT or its `exp` is past.
    fn token(&self) -> Result<String, SlurmError> {
        let token = if self.token_file.as_os_str().is_empty() {
            self.token.clone()
        } else {
            let text = std::fs::read_to_string(&self.token_file)
                .map_err(|e| SlurmError::BadToken(format!("{}: {e}", self.token_file.display())))?;
            // `scontrol token` prints SLURM_JWT=…; a file may hold that line.
            let text = text.trim();
            text.strip_prefix("SLURM_JWT=").unwrap_or(text).to_string()
        };
        let expires = jwt_expiry(&token).map_err(SlurmError::BadToken)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Some(expires) = expires.filter(|e| *e <= now) {
            return Err(SlurmError::TokenExpired {
                user: self.user.clone(),
                ago_s: now - expires,
            });
        }
        Ok(token)
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, SlurmError> {
        let token = self.token()?;
        let unavailable = |reason: String| SlurmError::Unavailable {
            url: self.url.clone(),
            reason,
        };
        let host = match &self.address {
            Address::Tcp { authority } => authority.clone(),
            Address::Unix(_) => "localhost".to_string(),
        };
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, host)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "application/json")
            .header("X-SLURM-USER-NAME", &self.user)
            .header("X-SLURM-USER-TOKEN", token)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unavailable(format!("building {method} {path}: {e}")))?;
        let exchange = async {
            let (status, bytes) = match &self.address {
                Address::Tcp { authority } => {
                    let stream = TcpStream::connect(authority.as_str())
                        .await
                        .map_err(|e| format!("connecting: {e}"))?;
                    send(stream, request).await?
                }
                Address::Unix(path) => {
                    let stream = UnixStream::connect(path)
                        .await
                        .map_err(|e| format!("connecting: {e}"))?;
                    send(stream, request).await?
                }
            };
            // Some refusals (401, 404) come as plain text.
            let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                Value::String(String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into())
            });
            Ok::<_, String>(Answer { status, body })
        };
        let failure = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(reason)) => Err(reason),
            Err(_) => Err(format!(
                "no answer within {:?} (slurm.request_timeout)",
                self.timeout
            )),
        };
        // Without the request, so that it reads the same whatever was asked
        // while slurmrestd stays down.
        *self
            .unreachable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = failure
            .as_ref()
            .err()
            .map(|reason| unavailable(reason.clone()).to_string());
        failure.map_err(|reason| unavailable(format!("{method} {path}: {reason}")))
    }
}

async fn send<S>(stream: S, request: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let driver = tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("sending: {e}"))?;
    let status = response.status();
    let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the answer (at most {MAX_ANSWER_BYTES} bytes): {e}"))?
        .to_bytes();
    driver.abort();
    Ok((status, bytes))
}

/// A JWT's `exp` (seconds since the epoch), when it has one; an error when
/// the text is not a JWT at all.
fn jwt_expiry(token: &str) -> Result<Option<u64>, String> {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(if token.is_empty() {
            "is empty".into()
        } else {
            "is not a JWT (three base64url parts joined by dots)".into()
        });
    };
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| format!("the JWT's payload is not base64url: {e}"))?;
    let claims: Value = serde_json::from_slice(&claims)
        .map_err(|e| format!("the JWT's payload is not JSON: {e}"))?;
    Ok(claims["exp"].as_u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        let encode = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", encode("{\"alg\":\"HS256\"}"), encode(claims))
    }

    #[test]
    fn a_jwt_says_when_it_expires() {
        assert_eq!(
            jwt_expiry(&jwt("{\"exp\":1700000000,\"sun\":\"alice\"}")),
            Ok(Some(1700000000))
        );
        assert_eq!(jwt_expiry(&jwt("{\"sun\":\"alice\"}")), Ok(None));
        assert!(jwt_expiry("garbage").unwrap_err().contains("not a JWT"));
        assert!(jwt_expiry("").unwrap_err().contains("empty"));
    }

    #[test]
    fn urls_are_checked() {
        let config = |url: &str| SlurmConfig {
            rest_url: url.into(),
            user: "alice".into(),
            token: "t".into(),
            ..SlurmConfig::default()
        };
        assert!(RestClient::new(&config("http://login1:6820")).is_ok());
        assert!(RestClient::new(&config("unix:///run/slurmrestd.sock")).is_ok());
        let error = RestClient::new(&config("https://login1:6820"))
            .err()
            .unwrap();
        assert!(
            error.contains("slurm.rest_url") && error.contains("https://login1:6820"),
            "{error}"
        );
        let no_token = SlurmConfig {
            token: String::new(),
            ..config("http://login1:6820")
        };
        assert!(
            RestClient::new(&no_token)
                .err()
                .unwrap()
                .contains("slurm.token")
        );
    }
}

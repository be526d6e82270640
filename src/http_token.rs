//! The daemon's token: a secret the daemon writes at start to `http_token_file` (mode 0600, in a
//! folder only the pod's containers share) so that its clients can tell it from any other process
//! that listens on `listen` (every container of a pod shares loopback).
//! - `wal-fetch` sends a fresh nonce with `GET /wal/{name}` (and `wal-switch` with `GET /status`)
//!   and takes the answer only with `x-pgkeep-proof: HMAC-SHA256(token, "pgkeep-proof-v1\n" nonce
//!   "\n" subject)`, where the subject is `wal <served name> <length> <hex of the object's
//!   header>` for a WAL file (the header's checksum then holds the bytes), `absent <name>` for a
//!   404, and the body itself for `/status`. The token never goes over the connection, so an
//!   impostor learns nothing.
//! - `POST /wal-switch`, `POST /backups` and `POST /marks` (which act on the database) need
//!   `Authorization: Bearer <token>`.

use std::io::Read;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header carrying the client's nonce.
pub const NONCE_HEADER: &str = "x-pgkeep-nonce";
/// The header carrying the daemon's proof.
pub const PROOF_HEADER: &str = "x-pgkeep-proof";

/// A nonce is 16 to 64 hex digits.
pub fn valid_nonce(n: &str) -> bool {
    (16..=64).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_hexdigit())
}

#[derive(Clone)]
pub struct Token {
    secret: [u8; 32],
    pub file: PathBuf,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({})", self.file.display())
    }
}

fn random<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b)
}

/// A fresh nonce for one request.
pub fn nonce() -> std::io::Result<String> {
    Ok(hex::encode(random::<16>()?))
}

/// An answer of the daemon to a request that carried a fresh nonce: believed only as far as
/// [`Answer::proves`] says.
pub struct Answer {
    token: Token,
    nonce: String,
    pub response: crate::http_client::Response,
}

impl Answer {
    /// Whether the answer carries the daemon's proof for `subject`.
    pub fn proves(&self, subject: &[u8]) -> bool {
        self.response
            .header(PROOF_HEADER)
            .is_some_and(|p| self.token.verify(&self.nonce, subject, p))
    }
}

/// Why the daemon was not asked, or did not answer.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// Its token could not be read: no answer could be believed, so none was asked for.
    #[error("cannot read the daemon's token {} ({cause}; http_token_file: the daemon writes it at start, and both must name the same file)", file.display())]
    Token {
        file: PathBuf,
        cause: std::io::Error,
    },
    /// Nothing answered on `listen` in time, or the answer was cut off or too long (or no nonce
    /// could be made for the request).
    #[error("no answer from a daemon at {listen}: {cause:#}")]
    NoAnswer {
        listen: std::net::SocketAddr,
        cause: anyhow::Error,
    },
}

/// `GET path` of the daemon at `listen`, with a fresh nonce its answer must prove (the token read
/// from `token_file` first: only the daemon holds it); within `timeout`, at most `limit` bytes.
pub async fn ask(
    listen: std::net::SocketAddr,
    token_file: &Path,
    path: &str,
    timeout: std::time::Duration,
    limit: usize,
) -> Result<Answer, AskError> {
    let token = Token::read(token_file).map_err(|cause| AskError::Token {
        file: token_file.to_path_buf(),
        cause,
    })?;
    let no_answer = |cause: anyhow::Error| AskError::NoAnswer { listen, cause };
    let nonce = nonce().map_err(|e| no_answer(e.into()))?;
    let response = crate::http_client::request(
        listen,
        "GET",
        path,
        timeout,
        limit,
        &[(NONCE_HEADER, &nonce)],
    )
    .await
    .map_err(no_answer)?;
    Ok(Answer {
        token,
        nonce,
        response,
    })
}

impl Token {
    /// A new token, written to `file` (replacing any earlier one) readable by this user only.
    pub fn create(file: &Path) -> std::io::Result<Token> {
        use std::os::unix::fs::PermissionsExt;
        let secret = random::<32>()?;
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        crate::fsutil::write_atomic(file, hex::encode(secret).as_bytes())?;
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))?;
        Ok(Token {
            secret,
            file: file.to_path_buf(),
        })
    }

    /// The token the daemon wrote to `file`.
    pub fn read(file: &Path) -> std::io::Result<Token> {
        let text = std::fs::read_to_string(file)?;
        let bytes = hex::decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "not a pgkeep token")
            })?;
        Ok(Token {
            secret: bytes,
            file: file.to_path_buf(),
        })
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.secret).expect("any key length")
    }

    /// The proof of an answer about `subject` (what the answer says, or names and sizes).
    pub fn proof(&self, nonce: &str, subject: &[u8]) -> String {
        hex::encode(self.proof_mac(nonce, subject).finalize().into_bytes())
    }

    fn proof_mac(&self, nonce: &str, subject: &[u8]) -> Hmac<Sha256> {
        let mut m = self.mac();
        m.update(format!("pgkeep-proof-v1\n{nonce}\n").as_bytes());
        m.update(subject);
        m
    }

    /// Whether `proof` is the daemon's for this answer (compared in constant time).
    pub fn verify(&self, nonce: &str, subject: &[u8], proof: &str) -> bool {
        let Ok(given) = hex::decode(proof) else {
            return false;
        };
        self.proof_mac(nonce, subject).verify_slice(&given).is_ok()
    }

    /// Whether an `Authorization` header carries this token (constant time).
    pub fn authorizes(&self, header: Option<&str>) -> bool {
        // The scheme is case-insensitive (RFC 9110); the token follows one space.
        let Some(given) = header
            .and_then(|h| h.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t)
        else {
            return false;
        };
        let Ok(given) = hex::decode(given.trim()) else {
            return false;
        };
        // Compared through the MAC: equal inputs give equal tags, in constant time.
        let mut a = self.mac();
        a.update(&given);
        let mut b = self.mac();
        b.update(&self.secret);
        b.verify_slice(&a.finalize().into_bytes()).is_ok()
    }
}

/// The subject of a `/wal` answer's proof: the name served, the length, and the stored object's
/// header, whose checksum `object::open` then holds the content to (so a proven answer cannot
/// carry other bytes).
pub fn wal_subject(served: &str, stored: &[u8]) -> Vec<u8> {
    let header = &stored[..stored.len().min(crate::storage::object::HEADER_LEN)];
    format!("wal {served} {} {}", stored.len(), hex::encode(header)).into_bytes()
}

/// The subject of an `/archived` answer: the daemon stored segment `name` with content of
/// SHA-256 `sha256` (hex, as asked).
pub fn archived_subject(name: &str, sha256: &str) -> Vec<u8> {
    format!("archived {name} {}", sha256.to_ascii_lowercase()).into_bytes()
}

/// The subject of a `/wal` answer saying that storage holds no such file.
pub fn absent_subject(name: &str) -> Vec<u8> {
    format!("absent {name}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_and_bearers() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        let t = Token::create(&file).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let read = Token::read(&file).unwrap();
        let n = nonce().unwrap();
        assert!(valid_nonce(&n));
        let p = t.proof(&n, b"wal 000000010000000000000001 10");
        assert!(read.verify(&n, b"wal 000000010000000000000001 10", &p));
        assert!(!read.verify(&n, b"wal 000000010000000000000002 10", &p));
        assert!(!read.verify(&n, b"wal 000000010000000000000001 11", &p));
        assert!(!read.verify(&nonce().unwrap(), b"wal 000000010000000000000001 10", &p));
        let other = Token::create(&dir.path().join("u")).unwrap();
        assert!(!other.verify(&n, b"wal 000000010000000000000001 10", &p));
        let bearer = format!("Bearer {}", std::fs::read_to_string(&file).unwrap());
        assert!(t.authorizes(Some(&bearer)));
        assert!(!other.authorizes(Some(&bearer)));
        assert!(!t.authorizes(None));
        assert!(!t.authorizes(Some("Bearer zz")));
        let secret = std::fs::read_to_string(&file).unwrap();
        assert!(t.authorizes(Some(&format!("bearer {secret}"))));
        assert!(!t.authorizes(Some(&format!("Basic {secret}"))));
        // A /wal proof binds the object's header (its checksum), not only name and length.
        let obj = [7u8; 100];
        let mut forged = obj;
        forged[20] ^= 1;
        let p = t.proof(&n, &wal_subject("000000010000000000000001", &obj));
        assert!(read.verify(&n, &wal_subject("000000010000000000000001", &obj), &p));
        assert!(!read.verify(&n, &wal_subject("000000010000000000000001", &forged), &p));
        assert!(!read.verify(&n, &absent_subject("000000010000000000000001"), &p));
        assert!(!valid_nonce("short") && !valid_nonce(&"g".repeat(20)));
    }
}

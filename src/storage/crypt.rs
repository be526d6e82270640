//! Client-side encryption of stored objects with age (X25519 recipients, the format of the `age`
//! tool). Writers need only the recipients (public keys); only readers of database content
//! (`restore`, `wal-fetch`) need an identity (a secret key).
//!
//! Recipients are named by a fingerprint, the first 4 bytes of the SHA-256 of their `age1…`
//! text, shown as 8 hex digits: object headers record the fingerprints of (up to three of) their
//! recipients, so that an error can say which key an object needs without holding any secret.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use age::secrecy::ExposeSecret;
use age::x25519;
use sha2::{Digest, Sha256};

/// Where the keys come from: the `encryption_recipients` and `encryption_identity_file` settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncryptionSettings {
    /// `age1…` public keys; new objects holding database content are encrypted to all of them.
    pub recipients: Vec<String>,
    /// A file of `AGE-SECRET-KEY-…` lines (comments and blank lines allowed), for reading.
    pub identity_file: Option<PathBuf>,
}

/// The parsed keys of one process.
#[derive(Clone, Default)]
pub struct Keys {
    recipients: Vec<x25519::Recipient>,
    identities: Vec<x25519::Identity>,
    identity_file: Option<PathBuf>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the identities themselves.
        f.debug_struct("Keys")
            .field("recipients", &self.recipient_fingerprints())
            .field("identities", &self.identities.len())
            .finish()
    }
}

/// An 8-hex-digit name for a recipient.
pub fn fingerprint(recipient: &x25519::Recipient) -> [u8; 4] {
    Sha256::digest(recipient.to_string().as_bytes())[0..4]
        .try_into()
        .expect("4 bytes")
}

pub fn fingerprint_hex(fp: &[u8; 4]) -> String {
    hex::encode(fp)
}

/// Parses one `encryption_recipients` entry. The message never repeats a secret key that was put
/// here by mistake.
pub fn parse_recipient(text: &str) -> Result<x25519::Recipient, String> {
    let text = text.trim();
    if text.to_ascii_uppercase().starts_with("AGE-SECRET-KEY-") {
        return Err(
            "a secret key (AGE-SECRET-KEY-…) is not a recipient: give the public key \
                    (age1…, printed by `pgkeep keygen` or `age-keygen -y`), and keep the secret \
                    key out of the sidecar's configuration"
                .into(),
        );
    }
    x25519::Recipient::from_str(text).map_err(|e| {
        let shown: String = text.chars().take(12).collect();
        format!("{shown:?}… is not an age X25519 recipient (age1…): {e}")
    })
}

/// Reads an identity file: `AGE-SECRET-KEY-…` lines, `#` comments and blank lines (the format
/// `age-keygen` writes). Errors name the line, never its content.
pub fn load_identities(path: &Path) -> Result<Vec<x25519::Identity>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the identity file {}: {e}", path.display()))?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let id = x25519::Identity::from_str(line).map_err(|_| {
            format!(
                "{} line {}: not an age X25519 identity (AGE-SECRET-KEY-1…)",
                path.display(),
                i + 1
            )
        })?;
        out.push(id);
    }
    if out.is_empty() {
        return Err(format!(
            "the identity file {} holds no identity (AGE-SECRET-KEY-1… lines)",
            path.display()
        ));
    }
    Ok(out)
}

/// Why an encrypted object cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// The stored bytes are damaged or not what they claim to be.
    Damaged(String),
    /// The object is intact but no identity at hand can decrypt it.
    Locked(String),
}

impl Keys {
    pub fn from_settings(s: &EncryptionSettings) -> Result<Keys, String> {
        let recipients = s
            .recipients
            .iter()
            .enumerate()
            .map(|(i, r)| {
                parse_recipient(r)
                    .map_err(|e| format!("encryption_recipients entry {}: {e}", i + 1))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let identities = match &s.identity_file {
            Some(p) => load_identities(p)?,
            None => vec![],
        };
        Ok(Keys {
            recipients,
            identities,
            identity_file: s.identity_file.clone(),
        })
    }

    /// Whether new objects holding database content are encrypted.
    pub fn encrypts(&self) -> bool {
        !self.recipients.is_empty()
    }

    /// Whether an identity is at hand to read encrypted objects.
    pub fn decrypts(&self) -> bool {
        !self.identities.is_empty()
    }

    pub fn recipients(&self) -> &[x25519::Recipient] {
        &self.recipients
    }

    pub fn recipient_fingerprints(&self) -> Vec<String> {
        self.recipients
            .iter()
            .map(|r| fingerprint_hex(&fingerprint(r)))
            .collect()
    }

    fn identity_fingerprints(&self) -> Vec<String> {
        self.identities
            .iter()
            .map(|i| fingerprint_hex(&fingerprint(&i.to_public())))
            .collect()
    }

    /// Encrypts what is written to the returned writer into `out`; `finish` it.
    pub fn encrypt_to<W: Write>(&self, out: W) -> io::Result<age::stream::StreamWriter<W>> {
        let enc = age::Encryptor::with_recipients(
            self.recipients.iter().map(|r| r as &dyn age::Recipient),
        )
        .map_err(io::Error::other)?;
        enc.wrap_output(out)
    }

    /// A reader of the plaintext of `ciphertext`, an age file encrypted to the recipients whose
    /// fingerprints `to` names (`count` recipients in all).
    pub fn decrypt<'a>(
        &self,
        ciphertext: &'a [u8],
        to: &[[u8; 4]],
        count: u8,
    ) -> Result<impl Read + 'a, OpenError> {
        let named = to
            .iter()
            .map(fingerprint_hex)
            .collect::<Vec<_>>()
            .join(", ");
        let more = if usize::from(count) > to.len() {
            format!(" and {} more", usize::from(count) - to.len())
        } else {
            String::new()
        };
        let encrypted_to = format!("encrypted to {count} age recipient(s) ({named}{more})");
        if self.identities.is_empty() {
            return Err(OpenError::Locked(format!(
                "{encrypted_to}, and no identity is configured to decrypt it: set \
                 encryption_identity_file (PGKEEP_ENCRYPTION_IDENTITY_FILE) to a file holding \
                 the matching AGE-SECRET-KEY"
            )));
        }
        let dec = age::Decryptor::new_buffered(ciphertext)
            .map_err(|e| OpenError::Damaged(format!("not a readable age file: {e}")))?;
        dec.decrypt(self.identities.iter().map(|i| i as &dyn age::Identity))
            .map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => OpenError::Locked(format!(
                    "{encrypted_to}, none of which matches the {} identit{} in {} ({})",
                    self.identities.len(),
                    if self.identities.len() == 1 {
                        "y"
                    } else {
                        "ies"
                    },
                    self.identity_file
                        .as_deref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    self.identity_fingerprints().join(", ")
                )),
                e => OpenError::Damaged(format!("age decryption failed: {e}")),
            })
    }
}

/// A new identity as an identity file (the `age-keygen` format) and its recipient.
pub fn generate() -> (String, String) {
    let id = x25519::Identity::generate();
    let recipient = id.to_public();
    let file = format!(
        "# created: {}\n# public key: {recipient}\n# fingerprint: {}\n{}\n",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        fingerprint_hex(&fingerprint(&recipient)),
        id.to_string().expose_secret()
    );
    (file, recipient.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_key_given_as_recipient_is_refused_without_being_repeated() {
        let (file, recipient) = generate();
        let secret = file.lines().last().unwrap();
        let err = parse_recipient(secret).unwrap_err();
        assert!(err.contains("secret key"), "{err}");
        assert!(!err.contains(&secret[16..]), "{err}");
        assert!(parse_recipient(&recipient).is_ok());
        let err = parse_recipient("age1notakey").unwrap_err();
        assert!(err.contains("not an age X25519 recipient"), "{err}");
    }

    #[test]
    fn identity_files_in_the_age_keygen_format_load_and_bad_lines_are_named_not_shown() {
        let dir = tempfile::tempdir().unwrap();
        let (file, recipient) = generate();
        let p = dir.path().join("id.txt");
        std::fs::write(&p, &file).unwrap();
        let ids = load_identities(&p).unwrap();
        assert_eq!(ids[0].to_public().to_string(), recipient);
        std::fs::write(&p, format!("{file}AGE-SECRET-KEY-1BROKEN\n")).unwrap();
        let err = load_identities(&p).err().unwrap();
        assert!(err.contains("line 5"), "{err}");
        assert!(!err.contains("BROKEN"), "{err}");
        std::fs::write(&p, "# nothing\n").unwrap();
        assert!(
            load_identities(&p)
                .err()
                .unwrap()
                .contains("holds no identity")
        );
    }
}

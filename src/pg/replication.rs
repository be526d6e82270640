//! A small client of Postgres' replication protocol: startup with `replication=true`,
//! authentication (trust and SCRAM-SHA-256; cleartext and md5 only when allowed), TLS as `sslmode`
//! says (see `tls`), simple queries, and CopyOut/CopyBoth
//! streams. Upstream tokio-postgres cannot open a replication connection, so this frames messages
//! itself and leaves the message codecs to `postgres-protocol` (whose parser does not know the
//! CopyBothResponse tag 'W', handled here).

use std::collections::HashMap;

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::conninfo::PgConnInfo;

/// Largest message accepted from the server (CopyData of a base backup is far smaller).
const MAX_MESSAGE: usize = 256 << 20;

pub use super::error::PgError;

/// One result set of a simple query, as text.
#[derive(Debug, Default, Clone)]
pub struct ResultSet {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl ResultSet {
    /// The value of `column` in the first row.
    pub fn first(&self, column: &str) -> Option<&str> {
        let i = self.columns.iter().position(|c| c == column)?;
        self.rows.first()?.get(i)?.as_deref()
    }
}

/// What the server sends while a query runs.
#[derive(Debug)]
pub enum Event {
    /// A complete result set (RowDescription, DataRows, CommandComplete).
    Rows(ResultSet),
    /// A CopyOut or CopyBoth stream starts; read it with [`ReplConnection::next_copy_data`].
    CopyStart { both: bool },
    /// The query finished (ReadyForQuery).
    Done,
}

/// A replication connection (`replication=true`).
pub struct ReplConnection {
    io: super::tls::PgStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// ParameterStatus values the server reported (server_version, ...).
    pub params: HashMap<String, String>,
    /// An ErrorResponse ended the copy stream: returned once the server's ReadyForQuery is read
    /// (kept here, so a read cancelled in between loses nothing).
    copy_failed: Option<PgError>,
}

/// The answer to IDENTIFY_SYSTEM.
#[derive(Debug, Clone)]
pub struct SystemInfo {
    pub system_identifier: u64,
    pub timeline: u32,
    pub xlogpos: super::Lsn,
}

/// What pgkeep needs to know of a server before it streams from it or backs it up.
#[derive(Debug, Clone)]
pub struct ServerIdentity {
    pub system_identifier: u64,
    /// The server's current timeline.
    pub timeline: super::TimelineId,
    pub xlogpos: super::Lsn,
    pub seg_size: super::WalSegSize,
    /// `server_version_num`, like 150004.
    pub version_num: u32,
    /// `server_version` as the server reports it, like "15.4".
    pub version: String,
}

impl ServerIdentity {
    /// The major version, like 15.
    pub fn major(&self) -> u32 {
        self.version_num / 10000
    }

    /// Refuses a server whose major pgkeep does not support, naming both.
    pub fn check_supported(&self) -> Result<(), PgError> {
        let supported = super::SUPPORTED_MAJORS;
        if supported.contains(&self.major()) {
            return Ok(());
        }
        Err(PgError::Unsupported(format!(
            "the server runs Postgres {} ({}), which pgkeep {} does not support: it supports Postgres {} to {}",
            self.version,
            self.version_num,
            env!("CARGO_PKG_VERSION"),
            supported.start(),
            supported.end()
        )))
    }
}

enum Incoming {
    Message(Message),
    CopyBothResponse,
}

impl ReplConnection {
    /// Connects and authenticates as a physical replication client.
    pub async fn connect(info: &PgConnInfo) -> Result<ReplConnection, PgError> {
        let (io, _tls) = super::tls::dial(info).await?;
        let mut conn = ReplConnection {
            io,
            rbuf: BytesMut::with_capacity(64 << 10),
            wbuf: BytesMut::new(),
            params: HashMap::new(),
            copy_failed: None,
        };
        frontend::startup_message(
            [
                ("user", info.user.as_str()),
                ("database", info.dbname.as_str()),
                ("replication", "true"),
                ("application_name", info.application_name.as_str()),
            ],
            &mut conn.wbuf,
        )?;
        conn.flush().await?;
        conn.authenticate(info).await?;
        loop {
            match conn.read().await? {
                Incoming::Message(Message::ReadyForQuery(_)) => return Ok(conn),
                Incoming::Message(Message::ParameterStatus(p)) => {
                    conn.params
                        .insert(p.name()?.to_string(), p.value()?.to_string());
                }
                Incoming::Message(Message::BackendKeyData(_) | Message::NoticeResponse(_)) => {}
                Incoming::Message(Message::ErrorResponse(e)) => return Err(server_error(e)),
                _ => return Err(PgError::protocol("unexpected message during startup")),
            }
        }
    }

    async fn authenticate(&mut self, info: &PgConnInfo) -> Result<(), PgError> {
        let password = || {
            info.password.as_deref().ok_or_else(|| {
                PgError::Auth(format!(
                    "the server asks user {:?} for a password: set PGPASSWORD or a password in the pg setting",
                    info.user
                ))
            })
        };
        let mut scram: Option<ScramSha256> = None;
        let mut scram_done = false;
        loop {
            match self.read().await? {
                Incoming::Message(Message::AuthenticationOk) => {
                    // Begun, SCRAM ends only with the server's proof that it knows the password.
                    if scram.is_some() && !scram_done {
                        return Err(PgError::Auth(
                            "the server ended SCRAM authentication without proving it knows the password".into(),
                        ));
                    }
                    return Ok(());
                }
                Incoming::Message(Message::AuthenticationCleartextPassword) => {
                    if !info.allow_weak_auth {
                        return Err(PgError::Auth(super::tls::weak_auth_refused(
                            "in cleartext",
                            &info.user,
                        )));
                    }
                    frontend::password_message(password()?.as_bytes(), &mut self.wbuf)?;
                }
                Incoming::Message(Message::AuthenticationMd5Password(body)) => {
                    if !info.allow_weak_auth {
                        return Err(PgError::Auth(super::tls::weak_auth_refused(
                            "as an md5 hash",
                            &info.user,
                        )));
                    }
                    let hash = postgres_protocol::authentication::md5_hash(
                        info.user.as_bytes(),
                        password()?.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)?;
                }
                Incoming::Message(Message::AuthenticationSasl(body)) => {
                    let mut mechs = body.mechanisms();
                    let mut found = false;
                    while let Some(m) = fallible_iterator::FallibleIterator::next(&mut mechs)? {
                        found |= m == "SCRAM-SHA-256";
                    }
                    if !found {
                        return Err(PgError::Auth(
                            "the server offers no SASL mechanism pgkeep supports".into(),
                        ));
                    }
                    let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut self.wbuf)?;
                    scram = Some(s);
                }
                Incoming::Message(Message::AuthenticationSaslContinue(body)) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| PgError::protocol("SASL continue before start"))?;
                    s.update(body.data())
                        .map_err(|e| PgError::Auth(e.to_string()))?;
                    frontend::sasl_response(s.message(), &mut self.wbuf)?;
                }
                Incoming::Message(Message::AuthenticationSaslFinal(body)) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| PgError::protocol("SASL final before start"))?;
                    s.finish(body.data())
                        .map_err(|e| PgError::Auth(e.to_string()))?;
                    scram_done = true;
                    continue;
                }
                Incoming::Message(Message::ErrorResponse(e)) => return Err(server_error(e)),
                Incoming::Message(_) => {
                    return Err(PgError::Auth(
                        "the server asks for an authentication method pgkeep does not support"
                            .into(),
                    ));
                }
                Incoming::CopyBothResponse => {
                    return Err(PgError::protocol("CopyBoth during authentication"));
                }
            }
            self.flush().await?;
        }
    }

    /// Sends a simple query; read what follows with [`ReplConnection::next_event`].
    pub async fn send_query(&mut self, sql: &str) -> Result<(), PgError> {
        frontend::query(sql, &mut self.wbuf)?;
        self.flush().await
    }

    /// The next result set, copy start or end of the query. An ErrorResponse is read through to
    /// ReadyForQuery and returned as [`PgError::Server`].
    pub async fn next_event(&mut self) -> Result<Event, PgError> {
        let mut set: Option<ResultSet> = None;
        loop {
            match self.read().await? {
                Incoming::CopyBothResponse => return Ok(Event::CopyStart { both: true }),
                Incoming::Message(m) => match m {
                    Message::RowDescription(body) => {
                        let mut cols = vec![];
                        let mut fields = body.fields();
                        while let Some(f) = fallible_iterator::FallibleIterator::next(&mut fields)?
                        {
                            cols.push(f.name().to_string());
                        }
                        set = Some(ResultSet {
                            columns: cols,
                            rows: vec![],
                        });
                    }
                    Message::DataRow(body) => {
                        let s = set
                            .as_mut()
                            .ok_or_else(|| PgError::protocol("DataRow without RowDescription"))?;
                        let buf = body.buffer();
                        let mut row = vec![];
                        let mut ranges = body.ranges();
                        while let Some(r) = fallible_iterator::FallibleIterator::next(&mut ranges)?
                        {
                            row.push(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                        }
                        s.rows.push(row);
                    }
                    Message::CommandComplete(_) => {
                        if let Some(s) = set.take() {
                            return Ok(Event::Rows(s));
                        }
                    }
                    Message::CopyOutResponse(_) => return Ok(Event::CopyStart { both: false }),
                    Message::ReadyForQuery(_) => return Ok(Event::Done),
                    Message::ErrorResponse(e) => {
                        let err = server_error(e);
                        // Drain to ReadyForQuery so the connection stays usable.
                        loop {
                            if let Incoming::Message(Message::ReadyForQuery(_)) =
                                self.read().await?
                            {
                                break;
                            }
                        }
                        return Err(err);
                    }
                    Message::ParameterStatus(p) => {
                        self.params
                            .insert(p.name()?.to_string(), p.value()?.to_string());
                    }
                    Message::NoticeResponse(_) | Message::EmptyQueryResponse => {}
                    _ => return Err(PgError::protocol("unexpected message in query response")),
                },
            }
        }
    }

    /// The next CopyData payload of a copy stream, or `None` at CopyDone.
    /// Cancellation safe: a call dropped at any await loses no message.
    pub async fn next_copy_data(&mut self) -> Result<Option<Bytes>, PgError> {
        if self.copy_failed.is_some() {
            return Err(self.end_copy_failure().await);
        }
        loop {
            match self.read().await? {
                Incoming::Message(Message::CopyData(d)) => return Ok(Some(d.into_bytes())),
                // A walsender leaving at shutdown may end with CommandComplete alone.
                Incoming::Message(Message::CopyDone | Message::CommandComplete(_)) => {
                    return Ok(None);
                }
                Incoming::Message(Message::NoticeResponse(_)) => {}
                Incoming::Message(Message::ParameterStatus(p)) => {
                    self.params
                        .insert(p.name()?.to_string(), p.value()?.to_string());
                }
                Incoming::Message(Message::ErrorResponse(e)) => {
                    self.copy_failed = Some(server_error(e));
                    return Err(self.end_copy_failure().await);
                }
                _ => return Err(PgError::protocol("unexpected message in a copy stream")),
            }
        }
    }

    /// After an ErrorResponse in a copy stream: reads up to the server's ReadyForQuery (or the
    /// connection's end) and returns the server's error.
    async fn end_copy_failure(&mut self) -> PgError {
        loop {
            match self.read().await {
                Ok(Incoming::Message(Message::ReadyForQuery(_))) | Err(_) => {
                    return self.copy_failed.take().expect("a failure");
                }
                Ok(_) => {}
            }
        }
    }

    /// Sends one CopyData message (CopyBoth streams: standby status updates).
    pub async fn send_copy_data(&mut self, data: &[u8]) -> Result<(), PgError> {
        frontend::CopyData::new(data)?.write(&mut self.wbuf);
        self.flush().await
    }

    /// Ends our side of a CopyBoth stream.
    pub async fn send_copy_done(&mut self) -> Result<(), PgError> {
        frontend::copy_done(&mut self.wbuf);
        self.flush().await
    }

    /// `UPLOAD_MANIFEST` (Postgres 17+): sends the backup manifest of the backup an incremental
    /// one is to be taken against; the next `BASE_BACKUP (INCREMENTAL)` on this connection uses it.
    /// The server checks its form and system identifier here (its error, if any, is returned);
    /// whether its WAL summaries reach back to it, only when BASE_BACKUP starts.
    pub async fn upload_manifest(&mut self, manifest: &[u8]) -> Result<(), PgError> {
        self.send_query("UPLOAD_MANIFEST").await?;
        loop {
            match self.read().await? {
                Incoming::Message(Message::CopyInResponse(_)) => break,
                Incoming::Message(Message::ErrorResponse(e)) => {
                    let err = server_error(e);
                    self.drain_to_ready().await?;
                    return Err(err);
                }
                Incoming::Message(Message::NoticeResponse(_) | Message::ParameterStatus(_)) => {}
                _ => {
                    return Err(PgError::protocol(
                        "UPLOAD_MANIFEST: expected CopyInResponse",
                    ));
                }
            }
        }
        for piece in manifest.chunks(1 << 20) {
            frontend::CopyData::new(piece)?.write(&mut self.wbuf);
            self.flush().await?;
        }
        frontend::copy_done(&mut self.wbuf);
        self.flush().await?;
        let mut failed = None;
        loop {
            match self.read().await? {
                Incoming::Message(Message::ReadyForQuery(_)) => break,
                Incoming::Message(Message::ErrorResponse(e)) => failed = Some(server_error(e)),
                Incoming::Message(_) => {}
                Incoming::CopyBothResponse => {
                    return Err(PgError::protocol("UPLOAD_MANIFEST: unexpected CopyBoth"));
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    async fn drain_to_ready(&mut self) -> Result<(), PgError> {
        loop {
            if let Incoming::Message(Message::ReadyForQuery(_)) = self.read().await? {
                return Ok(());
            }
        }
    }

    /// Runs a query whose answer is result sets only, and returns them.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<ResultSet>, PgError> {
        self.send_query(sql).await?;
        let mut sets = vec![];
        loop {
            match self.next_event().await? {
                Event::Rows(s) => sets.push(s),
                Event::Done => return Ok(sets),
                Event::CopyStart { .. } => {
                    return Err(PgError::protocol(format!("{sql} started a copy stream")));
                }
            }
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemInfo, PgError> {
        let sets = self.simple_query("IDENTIFY_SYSTEM").await?;
        let set = sets
            .first()
            .ok_or_else(|| PgError::protocol("IDENTIFY_SYSTEM returned nothing"))?;
        let get = |c: &str| {
            set.first(c)
                .ok_or_else(|| PgError::protocol(format!("IDENTIFY_SYSTEM lacks {c}")))
        };
        Ok(SystemInfo {
            system_identifier: get("systemid")?
                .parse()
                .map_err(|_| PgError::protocol("bad systemid"))?,
            timeline: get("timeline")?
                .parse()
                .map_err(|_| PgError::protocol("bad timeline"))?,
            xlogpos: get("xlogpos")?
                .parse()
                .map_err(|_| PgError::protocol("bad xlogpos"))?,
        })
    }

    /// Connects and learns who the server is: IDENTIFY_SYSTEM, its segment size and version.
    pub async fn connect_identified(
        info: &PgConnInfo,
    ) -> Result<(ReplConnection, ServerIdentity), PgError> {
        let mut conn = ReplConnection::connect(info).await?;
        let sys = conn.identify_system().await?;
        let seg_size = conn.wal_segment_size().await?;
        let shown = conn.show("server_version_num").await?;
        let version_num = shown.trim().parse().map_err(|_| {
            PgError::protocol(format!("the server reports server_version_num {shown:?}"))
        })?;
        let identity = ServerIdentity {
            system_identifier: sys.system_identifier,
            timeline: super::TimelineId::new(sys.timeline)
                .ok_or_else(|| PgError::protocol("the server reports timeline 0"))?,
            xlogpos: sys.xlogpos,
            seg_size,
            version_num,
            version: conn
                .params
                .get("server_version")
                .cloned()
                .unwrap_or_default(),
        };
        identity.check_supported()?;
        Ok((conn, identity))
    }

    /// The value of a setting (`SHOW name`), as the server prints it.
    pub async fn show(&mut self, name: &str) -> Result<String, PgError> {
        let sets = self.simple_query(&format!("SHOW {name}")).await?;
        sets.first()
            .and_then(|s| s.rows.first())
            .and_then(|r| r.first().cloned().flatten())
            .ok_or_else(|| PgError::protocol(format!("SHOW {name} returned nothing")))
    }

    /// The server's WAL segment size (`SHOW wal_segment_size`), validated.
    pub async fn wal_segment_size(&mut self) -> Result<super::WalSegSize, PgError> {
        let shown = self.show("wal_segment_size").await?;
        parse_pg_size(&shown)
            .and_then(|b| u32::try_from(b).ok())
            .and_then(super::WalSegSize::new)
            .ok_or_else(|| {
                PgError::protocol(format!(
                    "the server reports an invalid wal_segment_size {shown:?}"
                ))
            })
    }

    async fn flush(&mut self) -> Result<(), PgError> {
        self.io.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        self.io.flush().await?;
        Ok(())
    }

    async fn read(&mut self) -> Result<Incoming, PgError> {
        loop {
            if self.rbuf.len() >= 5 {
                let tag = self.rbuf[0];
                let len = i32::from_be_bytes(self.rbuf[1..5].try_into().unwrap());
                if len < 4 || len as usize > MAX_MESSAGE {
                    return Err(PgError::protocol(format!("message length {len}")));
                }
                let total = 1 + len as usize;
                if self.rbuf.len() >= total {
                    if tag == b'W' {
                        self.rbuf.advance(total);
                        return Ok(Incoming::CopyBothResponse);
                    }
                    return match Message::parse(&mut self.rbuf)? {
                        Some(m) => Ok(Incoming::Message(m)),
                        None => Err(PgError::protocol("incomplete message")),
                    };
                }
                self.rbuf.reserve(total - self.rbuf.len());
            }
            if self.io.read_buf(&mut self.rbuf).await? == 0 {
                return Err(PgError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )));
            }
        }
    }
}

fn server_error(body: postgres_protocol::message::backend::ErrorResponseBody) -> PgError {
    let (mut severity, mut code, mut message, mut detail) =
        (String::new(), String::new(), String::new(), None);
    let mut fields = body.fields();
    while let Ok(Some(f)) = fallible_iterator::FallibleIterator::next(&mut fields) {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'S' => severity = v,
            b'C' => code = v,
            b'M' => message = v,
            b'D' => detail = Some(v),
            _ => {}
        }
    }
    PgError::Server {
        severity,
        code,
        message,
        detail,
    }
}

/// Parses a size as Postgres prints it (`16MB`, `1GB`, `8kB`) into bytes.
pub fn parse_pg_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_supported_majors_pass() {
        let server = |version_num: u32, version: &str| super::ServerIdentity {
            system_identifier: 1,
            timeline: crate::pg::TimelineId::new(1).unwrap(),
            xlogpos: crate::pg::Lsn(0),
            seg_size: crate::pg::WalSegSize::new(16 << 20).unwrap(),
            version_num,
            version: version.into(),
        };
        for (num, text) in [(130023, "13.23"), (150018, "15.18"), (180004, "18.4")] {
            server(num, text).check_supported().unwrap();
        }
        for (num, text) in [(120022, "12.22"), (190000, "19beta1")] {
            let e = server(num, text).check_supported().unwrap_err().to_string();
            assert!(e.contains(text) && e.contains("13 to 18"), "{e}");
        }
    }

    #[test]
    fn pg_sizes() {
        assert_eq!(super::parse_pg_size("16MB"), Some(16 << 20));
        assert_eq!(super::parse_pg_size("1GB"), Some(1 << 30));
        assert_eq!(super::parse_pg_size("8kB"), Some(8192));
        assert_eq!(super::parse_pg_size("12 parsecs"), None);
    }
}

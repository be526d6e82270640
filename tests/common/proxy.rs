//! A hostile peer between pgkeep and a real Postgres: a loopback TCP proxy that passes every
//! byte through, except that it rewrites the page magic of every WAL page the server streams
//! (`XLogData` in CopyData), as a server of a Postgres major pgkeep does not know would send it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

/// WAL page size of every cluster the tests make.
const PAGE: u64 = 8192;

pub struct MagicProxy {
    pub port: u16,
}

impl MagicProxy {
    /// Listens on a loopback port and forwards to `127.0.0.1:upstream`, writing `magic` into each
    /// streamed WAL page header. Runs until the test process ends.
    pub fn start(upstream: u16, magic: u16) -> MagicProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut s2);
                    let _ = s2.shutdown(std::net::Shutdown::Write);
                });
                thread::spawn(move || rewrite(server, client, magic));
            }
        });
        MagicProxy { port }
    }
}

/// Copies server messages to the client, message by message (type byte, length, payload).
fn rewrite(mut from: TcpStream, mut to: TcpStream, magic: u16) {
    let mut head = [0u8; 5];
    loop {
        if from.read_exact(&mut head).is_err() {
            break;
        }
        let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len.saturating_sub(4)];
        if from.read_exact(&mut payload).is_err() {
            break;
        }
        if head[0] == b'd' && payload.first() == Some(&b'w') && payload.len() > 25 {
            let start = u64::from_be_bytes(payload[1..9].try_into().unwrap());
            let data = &mut payload[25..];
            let mut at = ((PAGE - start % PAGE) % PAGE) as usize;
            while at + 2 <= data.len() {
                data[at..at + 2].copy_from_slice(&magic.to_le_bytes());
                at += PAGE as usize;
            }
        }
        if to
            .write_all(&head)
            .and_then(|_| to.write_all(&payload))
            .is_err()
        {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

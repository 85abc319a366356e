//! The checks every header block passes before it goes on (RFC 9113 §8.2–8.3): field names
//! in lower case, no connection-specific fields (`te` only as "trailers"), pseudo-header
//! fields known, once each, before the others, a `:path` not empty, and the ones each kind of
//! block needs.

/// What a header block is, for the checks of §8.3.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Block {
    Request,
    Response,
    Trailers,
}

/// The checks of RFC 9113 §8.2–8.3 on one block, field by field.
pub struct FieldCheck {
    block: Block,
    regular_seen: bool,
    /// :method, :scheme, :path, :authority, :status seen.
    pseudo: [bool; 5],
    pub informational: bool,
    malformed: bool,
}

impl FieldCheck {
    pub fn new(block: Block) -> Self {
        Self {
            block,
            regular_seen: false,
            pseudo: [false; 5],
            informational: false,
            malformed: false,
        }
    }

    pub fn field(&mut self, name: &[u8], value: &[u8]) {
        if let Some(pseudo) = name.strip_prefix(b":") {
            let slot = match (self.block, pseudo) {
                (Block::Request, b"method") => 0,
                (Block::Request, b"scheme") => 1,
                (Block::Request, b"path") => 2,
                (Block::Request, b"authority") => 3,
                (Block::Response, b"status") => {
                    self.informational = value.first() == Some(&b'1');
                    4
                }
                _ => {
                    self.malformed = true;
                    return;
                }
            };
            if self.regular_seen || self.pseudo[slot] || (slot == 2 && value.is_empty()) {
                self.malformed = true;
            }
            self.pseudo[slot] = true;
            return;
        }
        self.regular_seen = true;
        let connection_specific = matches!(
            name,
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding" | b"upgrade"
        );
        if name.is_empty()
            || name.iter().any(u8::is_ascii_uppercase)
            || connection_specific
            || (name == b"te" && value != b"trailers")
        {
            self.malformed = true;
        }
    }

    pub fn is_valid(&self) -> bool {
        let complete = match self.block {
            Block::Request => self.pseudo[0] && self.pseudo[1] && self.pseudo[2],
            Block::Response => self.pseudo[4],
            Block::Trailers => true,
        };
        complete && !self.malformed
    }
}

//! Passive ejection of endpoints that keep failing: the pure logic lives in
//! `fanout_balance::eject`, shared with the wire data path.

pub use fanout_balance::eject::{Ejection, is_failure, may_eject};

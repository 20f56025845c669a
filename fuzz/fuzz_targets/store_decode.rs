//! A store entry file: `samkv::store::format::decode` and the listing reader.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| samkv::fuzzing::store_decode(data));

//! An HTTP request body of the chat, completion and document upload endpoints.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| samkv::fuzzing::request_decode(data));

//! Generated protobuf and gRPC code, and the descriptor set for reflection.
//! Nothing else lives here; `convert.rs` maps it to the domain types.
#![allow(clippy::all, clippy::pedantic, missing_docs)]

tonic::include_proto!("corral.v1");

/// The encoded `FileDescriptorSet` of proto/corral/v1, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("corral_descriptor");

//! berth's gRPC contracts: generated code only, one module per package.

#![allow(clippy::all, clippy::pedantic, missing_docs, rust_2018_idioms)]

/// The encoded `FileDescriptorSet` of every berth proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/berth_descriptor.bin"));

pub mod common {
    pub mod v1 {
        tonic::include_proto!("berth.common.v1");
    }
}
pub mod orchestrator {
    pub mod v1 {
        tonic::include_proto!("berth.orchestrator.v1");
    }
}
pub mod agent {
    pub mod v1 {
        tonic::include_proto!("berth.agent.v1");
    }
}
pub mod power {
    pub mod v1 {
        tonic::include_proto!("berth.power.v1");
    }
}
pub mod embedding {
    pub mod v1 {
        tonic::include_proto!("berth.embedding.v1");
    }
}
pub mod llmproxy {
    pub mod v1 {
        tonic::include_proto!("berth.llmproxy.v1");
    }
}

//! Wire compatibility with the Go r3map, checked on our compiled descriptors: the packages,
//! services, methods, messages, field names, numbers and types below are those of the Go
//! protos (`api/proto/mount/v1/backend.proto` and `api/proto/migration/v1/seeder.proto` in
//! pojntfx/r3map), written down here so the check needs no network. No Go toolchain can be
//! installed on this machine, so this table stands in for a Go peer.

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::FileDescriptorSet;

const MOUNT: &str = "com.pojtinger.felicitas.r3map.mount.v1";
const MIGRATION: &str = "com.pojtinger.felicitas.r3map.migration.v1";

/// (message, field, number, type); every field is optional-in-proto3 except where `repeated`.
const GO_FIELDS: &[(&str, &str, &str, i32, Type, bool)] = &[
    (MOUNT, "ReadAtArgs", "Length", 1, Type::Int32, false),
    (MOUNT, "ReadAtArgs", "Off", 2, Type::Int64, false),
    (MOUNT, "ReadAtReply", "N", 1, Type::Int32, false),
    (MOUNT, "ReadAtReply", "P", 2, Type::Bytes, false),
    (MOUNT, "WriteAtArgs", "Off", 1, Type::Int64, false),
    (MOUNT, "WriteAtArgs", "P", 2, Type::Bytes, false),
    (MOUNT, "WriteAtReply", "Length", 1, Type::Int32, false),
    (MIGRATION, "ReadAtArgs", "Length", 1, Type::Int32, false),
    (MIGRATION, "ReadAtArgs", "Off", 2, Type::Int64, false),
    (MIGRATION, "ReadAtReply", "N", 1, Type::Int32, false),
    (MIGRATION, "ReadAtReply", "P", 2, Type::Bytes, false),
    (MIGRATION, "SyncReply", "DirtyOffsets", 1, Type::Int64, true),
];

const GO_EMPTY_MESSAGES: &[(&str, &str)] = &[
    (MOUNT, "SyncArgs"),
    (MOUNT, "SyncReply"),
    (MIGRATION, "TrackArgs"),
    (MIGRATION, "TrackReply"),
    (MIGRATION, "SyncArgs"),
    (MIGRATION, "CloseArgs"),
    (MIGRATION, "CloseReply"),
];

/// (package, service, method, input, output); all unary.
const GO_METHODS: &[(&str, &str, &str, &str, &str)] = &[
    (MOUNT, "Backend", "ReadAt", "ReadAtArgs", "ReadAtReply"),
    (MOUNT, "Backend", "WriteAt", "WriteAtArgs", "WriteAtReply"),
    (MOUNT, "Backend", "Sync", "SyncArgs", "SyncReply"),
    (MIGRATION, "Seeder", "ReadAt", "ReadAtArgs", "ReadAtReply"),
    (MIGRATION, "Seeder", "Track", "TrackArgs", "TrackReply"),
    (MIGRATION, "Seeder", "Sync", "SyncArgs", "SyncReply"),
    (MIGRATION, "Seeder", "Close", "CloseArgs", "CloseReply"),
];

fn descriptors() -> FileDescriptorSet {
    FileDescriptorSet::decode(r3map_grpc::pb::DESCRIPTORS).unwrap()
}

fn file<'a>(set: &'a FileDescriptorSet, package: &str) -> &'a prost_types::FileDescriptorProto {
    set.file
        .iter()
        .find(|f| f.package() == package)
        .unwrap_or_else(|| panic!("no file of package {package}"))
}

#[test]
fn go_messages_have_the_go_names_numbers_and_types() {
    let set = descriptors();
    for &(package, message, field, number, kind, repeated) in GO_FIELDS {
        let msg = file(&set, package)
            .message_type
            .iter()
            .find(|m| m.name() == message)
            .unwrap_or_else(|| panic!("{package}.{message} is missing"));
        let found = msg
            .field
            .iter()
            .find(|f| f.name() == field)
            .unwrap_or_else(|| panic!("{package}.{message}.{field} is missing"));
        assert_eq!(found.number(), number, "{message}.{field}");
        assert_eq!(found.r#type(), kind, "{message}.{field}");
        let label = if repeated {
            Label::Repeated
        } else {
            Label::Optional
        };
        assert_eq!(found.label(), label, "{message}.{field}");
        assert!(
            found.proto3_optional.is_none(),
            "{message}.{field} must not be `optional`"
        );
    }
    // No field beyond Go's: a Go peer would drop it silently.
    for f in &set.file {
        if f.package() != MOUNT && f.package() != MIGRATION {
            continue;
        }
        assert_eq!(f.syntax(), "proto3");
        for msg in &f.message_type {
            let go: Vec<_> = GO_FIELDS
                .iter()
                .filter(|g| g.0 == f.package() && g.1 == msg.name())
                .collect();
            let empty = GO_EMPTY_MESSAGES.contains(&(f.package(), msg.name()));
            assert!(
                !go.is_empty() || empty,
                "{}.{} is not in the Go protos",
                f.package(),
                msg.name()
            );
            assert_eq!(
                msg.field.len(),
                go.len(),
                "{}.{} has extra fields",
                f.package(),
                msg.name()
            );
        }
    }
}

#[test]
fn go_services_have_the_go_methods() {
    let set = descriptors();
    for &(package, service, method, input, output) in GO_METHODS {
        let svc = file(&set, package)
            .service
            .iter()
            .find(|s| s.name() == service)
            .unwrap_or_else(|| panic!("{package}.{service} is missing"));
        let m = svc
            .method
            .iter()
            .find(|m| m.name() == method)
            .unwrap_or_else(|| panic!("{service}.{method} is missing"));
        assert_eq!(m.input_type(), format!(".{package}.{input}"));
        assert_eq!(m.output_type(), format!(".{package}.{output}"));
        assert!(
            !m.client_streaming() && !m.server_streaming(),
            "{service}.{method} is unary in Go"
        );
    }
    for f in &set.file {
        for svc in &f.service {
            if f.package() == MOUNT || f.package() == MIGRATION {
                assert_eq!(
                    svc.method.len(),
                    GO_METHODS
                        .iter()
                        .filter(|g| g.0 == f.package() && g.1 == svc.name())
                        .count(),
                    "{}.{} has methods Go lacks",
                    f.package(),
                    svc.name()
                );
            }
        }
    }
}

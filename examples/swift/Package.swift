// swift-tools-version:5.9
// The Swift notes app: `swift run -Xlinker -L../../target/debug Notes add buy milk` on a Mac,
// after `cargo build -p cubby-ffi` (see client/ffi/swift/README.md). Not built on the project's
// machines, which have no Swift toolchain.
import PackageDescription

let package = Package(
    name: "Notes",
    platforms: [.macOS(.v12)],
    dependencies: [.package(path: "../../client/ffi/swift")],
    targets: [
        .executableTarget(name: "Notes", dependencies: [.product(name: "Cubby", package: "swift")]),
    ]
)

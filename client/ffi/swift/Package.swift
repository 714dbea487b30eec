// swift-tools-version:5.9
// Cubby's client SDK for Swift: the UniFFI bindings generated from client/ffi (Sources/Cubby and
// Sources/CubbyFFI/include are generated; `bash client/ffi/test.sh --regenerate-swift` rewrites
// them) over the Rust library `libcubby_ffi`, which is built by cargo (see README.md).
import PackageDescription

let package = Package(
    name: "Cubby",
    platforms: [.macOS(.v12), .iOS(.v15)],
    products: [
        .library(name: "Cubby", targets: ["Cubby"]),
    ],
    targets: [
        // The C declarations of the Rust library's exported functions.
        .target(
            name: "CubbyFFI",
            path: "Sources/CubbyFFI",
            linkerSettings: [.linkedLibrary("cubby_ffi")]
        ),
        .target(name: "Cubby", dependencies: ["CubbyFFI"], path: "Sources/Cubby"),
        .testTarget(name: "CubbyTests", dependencies: ["Cubby"], path: "Tests/CubbyTests"),
    ]
)

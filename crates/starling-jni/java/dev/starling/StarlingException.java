package dev.starling;

/**
 * A failed step: the server refused it ({@link #getCode()} names the server's error code,
 * e.g. {@code "missing_credential"}), the server is unreachable, the local data is unusable,
 * a step came out of order, or a bug in the native library (a Rust panic, caught: the JVM
 * does not crash). {@link #getStatus()} is the status code of the C ABI (starling.h).
 */
public class StarlingException extends Exception {
    private static final long serialVersionUID = 1L;

    /** An argument was null or unusable. */
    public static final int INVALID_ARGUMENT = 1;
    /** The server refused the request: see {@link #getCode()}. */
    public static final int REFUSED = 2;
    /** The server could not be reached: try again later. */
    public static final int UNREACHABLE = 3;
    /** TLS failed. */
    public static final int TLS = 4;
    /** The local data (CSV file, submitted weights) is unusable. */
    public static final int DATA = 5;
    /** A step out of order, a closed device, or an unusable saved session. */
    public static final int STATE = 6;
    /** The server answered something this library does not understand. */
    public static final int PROTOCOL = 7;
    /** Local training failed. */
    public static final int TRAIN = 8;
    /** A bug inside the native library (a panic, caught): close the device and open it again. */
    public static final int PANIC = 9;

    private final String code;
    private final int status;

    /** Called by the native library. */
    public StarlingException(String message, String code, int status) {
        super(message);
        this.code = code == null ? "" : code;
        this.status = status;
    }

    /** The server's error code name when the server refused, else {@code ""}. */
    public String getCode() {
        return code;
    }

    /** The status: one of the constants of this class. */
    public int getStatus() {
        return status;
    }
}

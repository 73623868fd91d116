package dev.starling;

/**
 * The device's conditions as the host knows them; {@code null} means unknown. A task may
 * require some (charging, idle, unmetered network, a battery level): a device that does not
 * meet them gets {@link Outcome.Kind#NOT_ELIGIBLE} and sends no check-in.
 */
public final class Conditions {
    /** Nothing known. */
    public static final Conditions UNKNOWN = new Conditions(null, null, null, null);

    public final Boolean charging;
    public final Boolean idle;
    public final Boolean unmetered;
    /** Battery level from 0 to 1. */
    public final Float battery;

    public Conditions(Boolean charging, Boolean idle, Boolean unmetered, Float battery) {
        this.charging = charging;
        this.idle = idle;
        this.unmetered = unmetered;
        this.battery = battery;
    }

    /** A flag as the native call takes it: 1, 0, or -1 for unknown. */
    static int flag(Boolean b) {
        return b == null ? -1 : (b ? 1 : 0);
    }

    /** The battery level as the native call takes it: NaN for unknown. */
    static float level(Float f) {
        return f == null ? Float.NaN : f;
    }
}

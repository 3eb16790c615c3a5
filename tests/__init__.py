from hypothesis import HealthCheck, settings

# Property tests judge behaviour, never speed (that is bench/'s job): no per-example deadline and no "too slow"
# health check, so a loaded machine (CI with -j2, other work) cannot fail them.
settings.register_profile("caa", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("caa")


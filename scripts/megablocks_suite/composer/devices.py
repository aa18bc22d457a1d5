class DeviceCPU:
    pass


class DeviceGPU:
    pass

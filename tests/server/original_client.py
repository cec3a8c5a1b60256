"""The original service's client, verbatim from its README (`requests`), minus its demo call.

tests/server/test_compat.py runs it against a real server: what its users
run must keep working. Not our style on purpose, so not linted.
"""
# ruff: noqa

import requests
import json


class RequestHandler:
    def post(self, url, **kwargs):
        #  URL 后面的键值对，形式为 ?key1=value1&key2=value2
        # 此时，faskapi方法参数中必须定义好key
        params = kwargs.get("params")
        # 发送表单数据
        # 此时，faskapi方法参数中必须定义好key
        data = kwargs.get("data")
        # 发送的 JSON 数据。Content-Type 标头将被设置为 application/json。
        # 此时，faskapi方法参数中必须定义好字典dict接收
        json = kwargs.get("json")
        try:
            response = requests.post(url, params=params, data=data, json=json)
            if response.status_code == 200:
                return response.text
            else:
                return ""
        except Exception as e:
            print("post请求错误: %s" % e)

    def stream(self, url, **kwargs):
        params = kwargs.get("params")
        data = kwargs.get("data")
        json = kwargs.get("json")
        try:
            response = requests.post(url, params=params, data=data, json=json)
            for line in response.iter_lines():
                # 如果是二进制，需要decode；如果是文本/json不需要decode
                print(line.decode("utf-8"))
        except Exception as e:
            print("post请求错误: %s" % e)
